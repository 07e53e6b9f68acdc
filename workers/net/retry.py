"""One retry policy for outbound work: which HTTP answers are worth another try, and how long to wait.

Two kinds of retry share it, so "transient" and "back off" mean the same everywhere:
- a retry the broker schedules, as a new delivery of the message (a job: `runtime/`; a webhook:
  `output/webhook_delivery.py`): `backoff_s(retries)` is its countdown, and `spread_s()` the short
  random pause of a delivery put back for later;
- a retry in place, inside one attempt, through a short outage (an s3:// image read: `input/fetch.py`;
  queueing a webhook: `output/webhooks.py`; a result's write: `output/result_writer.py`):
  `retry_within(deadline_s, ...)`, tenacity's `Retrying` with `waits(...)` between its tries.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter
from tenacity.wait import wait_base

# 4xx answers that mean "not now" rather than "never": Request Timeout, Too Early (RFC 8470: repeat the
# request), Too Many Requests. Every 5xx is retried too.
RETRY_STATUS = frozenset({408, 425, 429})


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP answer with this status may succeed if asked again: 5xx, 408, 425 and 429."""
    return status >= 500 or status in RETRY_STATUS


def backoff_s(retries: int, base: float = 1.0, cap: float = 600.0) -> float:
    """Exponential backoff with jitter: between half and all of base * 2**retries seconds, at most `cap`."""
    return random.uniform(0.5, 1.0) * min(cap, base * 2**retries)


def spread_s(low: float = 1.0, high: float = 3.0) -> float:
    """A pause drawn evenly from `low`..`high` seconds: work put back for later (a delivery to a busy
    host) comes back spread out, not in one burst."""
    return random.uniform(low, high)


def waits(first_s: float, cap_s: float, jitter_s: float = 1.0) -> wait_base:
    """Pauses between tries in place: `first_s`, doubling, each plus up to `jitter_s` of jitter, never
    more than `cap_s`."""
    return wait_exponential_jitter(multiplier=first_s, max=cap_s, jitter=jitter_s)


def _any_error(exc: BaseException) -> bool:
    return isinstance(exc, Exception)


def retry_within(
    deadline_s: float,
    *,
    first_s: float = 0.2,
    cap_s: float = 5.0,
    jitter_s: float = 1.0,
    retry_if: Callable[[BaseException], bool] = _any_error,
    before_sleep: Callable[[RetryCallState], None] | None = None,
) -> Retrying:
    """Tries in place (`retrying(fn, *args)`, or `for attempt in retrying: with attempt: ...`) while
    they fail with an error `retry_if` accepts, until one succeeds or `deadline_s` has passed since
    the first; then the last error is raised as it was (never tenacity's RetryError).

    The defaults suit a short outage of a store or broker: the first retry 0.2 s after a failure,
    attempts never more than 5 s apart, so a service that comes back is used within seconds.
    `before_sleep` is told of each failed try before its pause.
    """
    return Retrying(
        stop=stop_after_delay(deadline_s),
        wait=waits(first_s, cap_s, jitter_s),
        retry=retry_if_exception(retry_if),
        before_sleep=before_sleep,
        reraise=True,
    )
