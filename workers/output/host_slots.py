"""A cap on concurrent work per receiver host, taken without waiting.

The callback worker's threads are shared by every receiver; a receiver that hangs must not hold more
than its share of them. `try_acquire` never blocks: a caller over the cap does something else (the
callback task puts its delivery back on the queue) instead of holding a thread to wait.
"""

from __future__ import annotations

import threading
from collections import Counter
from urllib.parse import urlsplit


def host_of(url: str) -> str:
    """The receiver a URL names: scheme, host and port (two ports of one host are two receivers)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


class HostSlots:
    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._busy: Counter[str] = Counter()
        self._lock = threading.Lock()

    def try_acquire(self, host: str) -> bool:
        with self._lock:
            if self._busy[host] >= self.per_host:
                return False
            self._busy[host] += 1
            return True

    def release(self, host: str) -> None:
        with self._lock:
            self._busy[host] -= 1
            if self._busy[host] <= 0:
                del self._busy[host]

    def busy(self, host: str) -> int:
        with self._lock:
            return self._busy[host]
