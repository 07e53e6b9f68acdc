"""Per-key rate limit (VARCO_RATE_LIMIT requests/s): a token bucket per key, in this gateway process.

Buckets live in process memory: N gateway replicas allow up to N times the rate in total. Each
bucket holds up to max(1, rate) tokens, so a key may burst one second's worth of requests. Failed
authentications have buckets per client address (access.py); a bucket that has refilled is the same
as none, so full ones are dropped once there are many, and addresses cannot grow the table for ever.
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
    SWEEP_ABOVE = 10_000  # buckets; past this, full ones are dropped (at most once a second)

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._buckets: dict[str, _Bucket] = {}
        self._swept_at = -math.inf

    def acquire(self, key: str, now: float | None = None) -> float:
        """Take one token for `key`: 0.0 when allowed, else the seconds until a token is there.

        Called from the event loop only (async dependency), so no lock is needed."""
        now = time.monotonic() if now is None else now
        if len(self._buckets) > self.SWEEP_ABOVE and now - self._swept_at >= 1.0:
            self._sweep(now)
        bucket = self._buckets.setdefault(key, _Bucket(self.capacity, now))
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _sweep(self, now: float) -> None:
        """Drop the buckets that have refilled by now: taking from a new full bucket is the same."""
        self._swept_at = now
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.at) * self.rate >= self.capacity]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(wait_s: float) -> str:
    """Retry-After takes whole seconds; round up so a retry at that time succeeds."""
    return str(max(1, math.ceil(wait_s)))
