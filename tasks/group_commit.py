"""Group commit: calls from many threads, each one Redis round trip, sent together as one.

A worker process runs a job per task thread, and the threads of one engine batch start and end together: each
claims its job, ends it, queues its webhook at about the same moment. `GroupCommit.call` hands one item to a
`flush(items) -> results` that takes many (one Lua script for all the claims, one Celery message for all the
webhooks). Without `linger_s` there is no timer and no added wait: the first caller flushes at once, and
callers that arrive while a flush runs wait for it to end, then go out together in the next one, led by the
first of them. A lone caller then costs what a direct call did; under load the calls per flush grow with the
load (the cost per job falls).
`linger_s` makes the leader wait that long before it takes the batch: the threads of one engine batch reach
their end a little apart (parse, result write), and in `bench/redis_cost.py` 2 ms raised the jobs per status
script call from about 1.4 to about 1.9, for 2 ms of a job's seconds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    __slots__ = ("done", "error", "item", "lead", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = threading.Event()
        self.lead = False  # woken to lead the next flush, not with a result
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    def __init__(self, flush: Callable[[list[T]], Sequence[R]], max_batch: int = 64, linger_s: float = 0.0) -> None:
        self._flush = flush
        self._max = max_batch
        self._linger_s = linger_s
        self._linger = threading.Event()
        self._lock = threading.Lock()
        self._pending: list[_Slot[T, R]] = []
        self._busy = False  # a flush is running: new callers wait for the next one
        self.flushes = 0  # how many flushes ran, and how many items they carried (for tests and benches)
        self.items = 0

    def call(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            self._pending.append(slot)
            lead = not self._busy
            self._busy = True
        while not lead:
            slot.done.wait()
            if not slot.lead:
                break
            slot.lead, lead = False, True
            slot.done.clear()
        if lead:
            self._lead()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _lead(self) -> None:
        """Flush what is pending (up to max_batch), then hand the lead to the first caller still waiting."""
        if self._linger_s:
            self._linger.wait(self._linger_s)  # never set: a sleep that code patching time.sleep leaves alone
        with self._lock:
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
        try:
            results = self._flush([s.item for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"flush answered {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # every caller of this flush raises what a direct call would have
            for s in batch:
                s.error = exc
        else:
            for s, result in zip(batch, results, strict=True):
                s.result = result
        with self._lock:
            self.flushes += 1
            self.items += len(batch)
            if self._pending:
                nxt = self._pending[0]
                nxt.lead = True
                nxt.done.set()
            else:
                self._busy = False
        for s in batch:
            s.done.set()
