"""One retry policy for outbound HTTP: which answers are worth another try, and how long to wait.

Image fetching (`input/fetch.py`), webhook delivery (`output/webhook_delivery.py`) and job retries
(`runtime/`) share it, so "transient" means the same everywhere.
"""

from __future__ import annotations

import random

# 4xx answers that mean "not now" rather than "never": Request Timeout, Too Early (RFC 8470: repeat the
# request), Too Many Requests. Every 5xx is retried too.
RETRY_STATUS = frozenset({408, 425, 429})


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP answer with this status may succeed if asked again: 5xx, 408, 425 and 429."""
    return status >= 500 or status in RETRY_STATUS


def backoff_s(retries: int, base: float = 1.0, cap: float = 600.0) -> float:
    """Exponential backoff with jitter: between half and all of base * 2**retries seconds, at most `cap`."""
    return random.uniform(0.5, 1.0) * min(cap, base * 2**retries)
