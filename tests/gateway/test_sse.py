"""`sse.watch`, the asyncio loop over tasks/waiting.py, against a scripted store: no Redis, no waiting.

Each scripted step is what the next store call answers (a status, None, or an error to raise); the fake
answers at once, so the loop's timing never matters here.
"""

from __future__ import annotations

import asyncio
import json
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

    def resubscribed(self) -> bool:
        return self.store.resubscribes.popleft() if self.store.resubscribes else False

    async def aclose(self) -> None:
        self.closed = True


class Store:
    """Reads answer from `reads` (the last one repeats), events from `events` (then None)."""

    def __init__(self, reads: list[Any], events: list[Any]) -> None:
        self.reads, self.events_left = deque(reads), deque(events)
        self.resubscribes: deque[bool] = deque()  # what each event's feed.resubscribed() answers (then False)
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

    async def events(self, job_id: str) -> Feed:
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


def test_a_feed_that_redis_py_subscribed_again_makes_the_watch_read_the_record() -> None:
    # Events published while the subscription was down are lost: the end is found by the read after it.
    store = Store([status(JobState.STARTED, 1), status(JobState.SUCCEEDED, 5)], [None, None])
    store.resubscribes.extend([False, True])
    assert [s.state for s in run(store) if s is not None] == [JobState.STARTED, JobState.SUCCEEDED]
    assert store.calls == ["read", "event", "event", "read"]  # not the next periodic read, 30 s on
    assert len(store.feeds) == 1


def test_an_outage_past_the_timeout_is_raised() -> None:
    store = Store([redis.TimeoutError("hung")], [])
    with pytest.raises(redis.TimeoutError):
        run(store, timeout=0.0)
    assert store.feeds[0].closed


# --- the frames: retry first, end last, ids that resume -------------------------------------------


def frames_of(store: Store, **kwargs: Any) -> list[str]:
    async def collect() -> list[str]:
        return [f.decode() async for f in sse.event_stream(store, "j", **kwargs)]  # type: ignore[arg-type]

    return asyncio.run(collect())


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def test_a_stream_begins_with_retry_and_ends_with_end_and_each_status_has_its_id() -> None:
    store = Store([status(JobState.QUEUED, 0)], [status(JobState.STARTED, 1), status(JobState.SUCCEEDED, 2)])
    frames = frames_of(store)
    assert frames[0] == "retry: 5000\n\n"
    assert [f.splitlines()[:2] for f in frames[1:4]] == [["event: status", f"id: {at(s)}"] for s in (0, 1, 2)]
    assert frames[4].splitlines()[0] == "event: end" and "id:" not in frames[4]  # the last id stays the status's
    assert json.loads(frames[4].splitlines()[1].removeprefix("data: ")) == {"job_id": "j", "state": "succeeded"}
    assert len(frames) == 5


def test_a_reconnect_gets_only_the_events_after_its_last_event_id() -> None:
    store = Store([status(JobState.STARTED, 1)], [status(JobState.SUCCEEDED, 2)])
    frames = frames_of(store, cursor=sse.Cursor.parse(at(1)))
    assert [f.splitlines()[0] for f in frames] == ["retry: 5000", "event: status", "event: end"]
    assert '"succeeded"' in frames[1] and f"id: {at(2)}" in frames[1]


def test_an_expired_record_ends_the_stream_with_no_state() -> None:
    frames = frames_of(Store([None], []))
    assert frames == ["retry: 5000\n\n", 'event: end\ndata: {"job_id": "j", "state": null}\n\n']


@pytest.mark.parametrize(
    "last_event_id",
    [None, "", "garbage", "2026-01-01T00:00:00", f"{T0.isoformat()}/x", "/1-0x", "1764542822812-0"],
)
def test_an_id_that_is_not_ours_resumes_from_the_start(last_event_id: str | None) -> None:
    assert sse.Cursor.parse(last_event_id) == sse.Cursor()


def test_an_id_names_the_last_status_and_the_last_text_sent() -> None:
    for cursor, event_id in [(sse.Cursor(T0), T0.isoformat()), (sse.Cursor(T0, "17-3"), f"{T0.isoformat()}/17-3"),
                             (sse.Cursor(None, "17-3"), "/17-3")]:  # fmt: skip
        assert cursor.event_id == event_id and sse.Cursor.parse(event_id) == cursor
    final = status(JobState.SUCCEEDED, 2)
    assert sse.Cursor(T0 + timedelta(seconds=2)).has_seen(final) and not sse.Cursor(T0).has_seen(final)
    assert not sse.Cursor(None, "17-3").has_seen(final)
