"""Which running jobs were cancelled: a pub/sub listener keeps a local set the engine polls cheaply."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import redis

from varco.tasks.keys import CANCEL_CHANNEL

log = logging.getLogger(__name__)


class CancelWatcher:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        # Jobs of this process, counted per delivery (a deferred second copy of a running job comes and goes
        # in another thread and must not unwatch it); cancels for others are ignored.
        self._running: Counter[str] = Counter()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="cancel-watcher", daemon=True)

    def start(self) -> CancelWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled

    def watch(self, job_id: str) -> None:
        """Start tracking a job of this process; call it before the job's record says started."""
        with self._lock:
            self._running[job_id] += 1

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._running[job_id] -= 1
            if self._running[job_id] <= 0:
                del self._running[job_id]
                self._cancelled.discard(job_id)

    def mark(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._running:
                self._cancelled.add(job_id)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self.mark(str(message["data"]))
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%r); reconnecting", exc)
                time.sleep(1.0)
