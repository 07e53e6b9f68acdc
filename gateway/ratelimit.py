"""Per-key rate limit (VARCO_RATE_LIMIT requests/s): a token bucket per key, in this gateway process.

Buckets live in process memory: N gateway replicas allow up to N times the rate in total. Each
bucket holds up to max(1, rate) tokens, so a key may burst one second's worth of requests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key: str, now: float | None = None) -> float:
        """Take one token for `key`: 0.0 when allowed, else the seconds until a token is there.

        Called from the event loop only (async dependency), so no lock is needed."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.setdefault(key, _Bucket(self.capacity, now))
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


def retry_after(wait_s: float) -> str:
    """Retry-After takes whole seconds; round up so a retry at that time succeeds."""
    return str(max(1, math.ceil(wait_s)))
