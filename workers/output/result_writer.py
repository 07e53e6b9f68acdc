"""Writes a computed result through a store outage: only the write is retried, in place.

A store outage must not cost the inference already done, nor count as a delivery: the result stays in
memory and its write is retried with capped exponential backoff and jitter (tenacity) until it lands or
`VARCO_STORE_RETRY_S` has passed. Before every try the job's status record is read: a job that ended
meanwhile (cancelled, failed, or finished by another run) gets nothing written. Each failed try shows the
job `retrying` with the store's error (not an attempt: only the write is retried).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tenacity import RetryCallState

from varco.tasks import tracing
from varco.tasks.errors import ResultStoreError
from varco.tasks.redaction import redact_text
from varco.tasks.schemas import JobState
from varco.tasks.status import StatusStore
from varco.workers.net.retry import retry_within

log = logging.getLogger(__name__)

# Backoff between tries: 0.5 s doubling, with up to 1 s of jitter, at most 20 s apart.
FIRST_WAIT_S, MAX_WAIT_S = 0.5, 20.0


class _JobEnded(Exception):
    """The job's record turned terminal while its result waited to be written."""


def write_result(
    write: Callable[[], str],
    deadline_s: float,
    *,
    job_id: str,
    statuses: StatusStore,
) -> str | None:
    """The result's URI once `write` (the job's store writes, safe to repeat) succeeded; None when the job's
    record in `statuses` says it ended before it could (nothing written).

    Past `deadline_s` the last error is raised as a permanent ResultStoreError.
    """

    def attempt() -> str:
        state = statuses.state(job_id)  # the state alone: HGET, not the whole record
        if state is not None and state.finished:
            raise _JobEnded
        return write()

    def waiting(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("job %s: result write failed (%r); retrying in %.1fs", job_id, exc, state.upcoming_sleep)
        error = ResultStoreError(f"cannot write the result yet, retrying: {exc!r}")
        statuses.transition(job_id, JobState.RETRYING, error=error.info())
        event = {"exception.type": type(exc).__name__, "exception.message": redact_text(str(exc))[:200]}
        tracing.event("varco.store_retry", event | {"varco.retry_in_s": state.upcoming_sleep})

    retrying = retry_within(
        deadline_s,
        first_s=FIRST_WAIT_S,
        cap_s=MAX_WAIT_S,
        retry_if=lambda exc: not isinstance(exc, _JobEnded),
        before_sleep=waiting,
    )
    try:
        return retrying(attempt)
    except _JobEnded:
        return None
    except Exception as exc:
        raise ResultStoreError(
            f"cannot write the result (retried for {deadline_s:.0f}s): {exc!r}", transient=False
        ) from exc
