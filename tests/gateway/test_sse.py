"""`sse.watch`, the asyncio loop over tasks/waiting.py, against a scripted store: no Redis, no waiting.

Each scripted step is what the next store call answers (a status, None, or an error to raise); the fake
answers at once, so the loop's timing never matters here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from varco.gateway import sse
from varco.tasks.schemas import JobState, JobStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def status(state: JobState, at_s: float, job_id: str = "j") -> JobStatus:
    return JobStatus(job_id=job_id, state=state, updated_at=T0 + timedelta(seconds=at_s))


class Feed:
    def __init__(self, store: Store) -> None:
        self.store, self.closed = store, False

    async def next(self, timeout_s: float) -> JobStatus | None:
        return self.store.answer("event")

    async def aclose(self) -> None:
        self.closed = True


class Store:
    """Reads answer from `reads` (the last one repeats), events from `events` (then None)."""

    def __init__(self, reads: list[Any], events: list[Any]) -> None:
        self.reads, self.events_left = deque(reads), deque(events)
        self.feeds: list[Feed] = []
        self.calls: list[str] = []

    def answer(self, kind: str) -> Any:
        self.calls.append(kind)
        queue = self.reads if kind == "read" else self.events_left
        value = (queue.popleft() if len(queue) > 1 or kind == "event" else queue[0]) if queue else None
        if isinstance(value, Exception):
            raise value
        return value

    async def get(self, job_id: str) -> JobStatus | None:
        return self.answer("read")

    async def events(self) -> Feed:
        self.feeds.append(Feed(self))
        return self.feeds[-1]


def run(store: Store, **kwargs: Any) -> list[JobStatus | None]:
    async def collect() -> list[JobStatus | None]:
        return [s async for s in sse.watch(store, "j", **kwargs)]  # type: ignore[arg-type]

    return asyncio.run(collect())


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    async def skip(_: float) -> None:
        return None

    monkeypatch.setattr(sse.asyncio, "sleep", skip)


def test_the_current_status_then_each_newer_one_until_the_end() -> None:
    events = [status(JobState.QUEUED, 0), status(JobState.SUCCEEDED, 9, "other"), status(JobState.STARTED, 1),
              status(JobState.STARTED, 1), status(JobState.SUCCEEDED, 2), status(JobState.FAILED, 3)]  # fmt: skip
    store = Store([status(JobState.QUEUED, 0.5)], events)
    states = [s.state for s in run(store) if s is not None]
    assert states == [JobState.QUEUED, JobState.STARTED, JobState.SUCCEEDED]
    assert [f.closed for f in store.feeds] == [True]


def test_a_vanished_record_ends_the_watch() -> None:
    assert run(Store([None], [])) == []


def test_a_redis_outage_is_ridden_out_and_the_record_read_again() -> None:
    outage = redis.ConnectionError("Redis went away")
    store = Store([status(JobState.STARTED, 1), outage, status(JobState.SUCCEEDED, 5)], [outage])
    assert [s.state for s in run(store) if s is not None] == [JobState.STARTED, JobState.SUCCEEDED]
    assert store.calls == ["read", "event", "read", "read"]  # the failed read is followed by another
    assert len(store.feeds) == 3 and all(f.closed for f in store.feeds)  # subscribed again after each failure


def test_an_outage_past_the_timeout_is_raised() -> None:
    store = Store([redis.TimeoutError("hung")], [])
    with pytest.raises(redis.TimeoutError):
        run(store, timeout=0.0)
    assert store.feeds[0].closed
