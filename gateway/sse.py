"""Watching a job's status without blocking the event loop, and Server-Sent Events of it.

`watch` is the asyncio loop over tasks/waiting.py, as `Client.wait` is the sync one: it takes a feed of its
job's events (from the process's one subscription to `varco:events`, `EventHub`) before it reads the
record, so no change slips between; it yields the current status first, then every newer one, until the
job is finished. It reads the record again when events may have been missed, and rides out a Redis outage
as `Client.wait` does.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime

import redis

from varco.gateway.job_deltas import follow
from varco.gateway.public_view import public_status
from varco.tasks.async_status import AsyncStatusStore, HubFeed
from varco.tasks.delta_stream import START, AsyncDeltaStream, Delta
from varco.tasks.schemas import JobStatus
from varco.tasks.waiting import OUTAGE_GRACE_S, Follow, Listen, Read, TimedOut, WaitPlan

HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream


async def watch(
    statuses: AsyncStatusStore,
    job_id: str,
    *,
    timeout: float | None = None,
    heartbeat_s: float | None = None,
    after: datetime | None = None,
    outage_grace_s: float = OUTAGE_GRACE_S,
) -> AsyncIterator[JobStatus | None]:
    """Yield the job's status now and at every change until it is finished (or `timeout` passes).

    With `heartbeat_s`, yields None after that long without a change (the caller sends a keep-alive).
    With `after`, statuses updated at or before it are not yielded (the client has them: Last-Event-ID).
    Ends early if the record disappears (expired). A Redis outage is ridden out for `outage_grace_s`."""
    plan = WaitPlan(time.monotonic(), timeout, outage_grace_s=outage_grace_s)
    follow = Follow(job_id, time.monotonic(), heartbeat_s)
    feed: HubFeed | None = await statuses.events(job_id)
    try:
        while not follow.finished:
            status: JobStatus | None = None
            try:
                if feed is None:
                    feed = await statuses.events(job_id)
                match plan.next_step(time.monotonic()):
                    case Read():
                        status = await statuses.get(job_id)
                        if status is None:
                            return
                    case Listen(seconds):
                        status = await feed.next(seconds)
                        if feed.resubscribed():  # the hub subscribed again: events may have been lost
                            plan.missed_events(time.monotonic())
                    case TimedOut():
                        return
                plan.answered()
            except (redis.ConnectionError, redis.TimeoutError):
                if not plan.outage(time.monotonic()):
                    raise
                if feed is not None:
                    await feed.aclose()
                feed = None
                await asyncio.sleep(plan.poll_interval_s)
            if (news := follow.offer(status, time.monotonic())) is not None:
                if after is None or news.updated_at is None or news.updated_at > after:
                    yield news
            elif follow.heartbeat(time.monotonic()):
                yield None
    finally:
        if feed is not None:
            await feed.aclose()


RETRY_MS = 5000  # EventSource waits this long before it reconnects (after `interrupted`, or a lost connection)
RETRY = f"retry: {RETRY_MS}\n\n".encode()
KEEP_ALIVE = b": keep-alive\n\n"
_DELTA_ID = re.compile(r"\d+-\d+")  # a Redis stream entry id


@dataclass(frozen=True)
class Cursor:
    """How far a client has read a job's stream; every event's `id` (and so a reconnect's Last-Event-ID).

    The id is the `updated_at` of the last status sent (ISO 8601), and in a stream with text, `/` and the
    last `delta`'s stream entry id: `2026-11-30T22:47:02.812345+00:00/1764542822812-0` (either part empty
    while none was sent). A client treats it as opaque and sends back the last one it saw."""

    status: datetime | None = None
    delta: str | None = None

    @property
    def event_id(self) -> str:
        at = self.status.isoformat() if self.status is not None else ""
        return at if self.delta is None else f"{at}/{self.delta}"

    @classmethod
    def parse(cls, last_event_id: str | None) -> Cursor:
        """A Last-Event-ID as a cursor; one that is not ours (malformed, no time zone) means the start."""
        at, _, delta = (last_event_id or "").partition("/")
        try:
            status = datetime.fromisoformat(at) if at else None
        except ValueError:
            return cls()
        if (status is not None and status.tzinfo is None) or (delta and not _DELTA_ID.fullmatch(delta)):
            return cls()
        return cls(status, delta or None)

    def has_seen(self, status: JobStatus) -> bool:
        """Whether the client was sent `status` already (a finished one: the stream had ended)."""
        return self.status is not None and status.updated_at is not None and status.updated_at <= self.status


class Frames:
    """A job's events as `text/event-stream` frames, each with the cursor reached as its id."""

    def __init__(self, job_id: str, cursor: Cursor) -> None:
        self.job_id, self.cursor = job_id, cursor
        self.last: JobStatus | None = None

    def frame(self, item: JobStatus | Delta | None) -> bytes:
        if item is None:
            return KEEP_ALIVE
        if isinstance(item, Delta):
            self.cursor = replace(self.cursor, delta=item.id)
            text = json.dumps({"text": item.text}, ensure_ascii=False)
            return f"event: delta\nid: {self.cursor.event_id}\ndata: {text}\n\n".encode()
        self.cursor, self.last = replace(self.cursor, status=item.updated_at or self.cursor.status), item
        data = public_status(item).model_dump_json()  # issue 21: gateway URLs, not store URIs
        return f"event: status\nid: {self.cursor.event_id}\ndata: {data}\n\n".encode()

    def end(self) -> bytes:
        """The last event: the job is finished (or its record expired: `state` null); the client closes."""
        state = self.last.state.value if self.last is not None and self.last.state.finished else None
        return b"event: end\ndata: " + json.dumps({"job_id": self.job_id, "state": state}).encode() + b"\n\n"


def interrupted_frame(reason: str, detail: str) -> bytes:
    """The last event of a stream cut short (open_streams.py): not final; EventSource reconnects by itself."""
    return b"event: interrupted\ndata: " + json.dumps({"reason": reason, "detail": detail}).encode() + b"\n\n"


async def event_stream(
    statuses: AsyncStatusStore,
    job_id: str,
    deltas: AsyncDeltaStream | None = None,
    *,
    cursor: Cursor = Cursor(),
    outage_grace_s: float = OUTAGE_GRACE_S,
) -> AsyncIterator[bytes]:
    """`text/event-stream` frames: `retry:`, one `status` event per change (JSON of the status), then
    `end`. A job submitted with `stream: true` has a `delta` event (`{"text": ...}`) for each piece of its
    answer too, and its final status comes after its last text. From `cursor` on (a reconnect's
    Last-Event-ID): the events after it."""
    yield RETRY
    frames = Frames(job_id, cursor)
    if deltas is not None and await deltas.is_open(job_id):
        items = _with_deltas(statuses, deltas, job_id, cursor, outage_grace_s)
    else:
        items = watch(statuses, job_id, heartbeat_s=HEARTBEAT_S, after=cursor.status, outage_grace_s=outage_grace_s)
    async for item in items:
        yield frames.frame(item)
    yield frames.end()


class _Done:
    """Both sides of a stream with text have ended."""


async def _with_deltas(
    statuses: AsyncStatusStore, deltas: AsyncDeltaStream, job_id: str, cursor: Cursor, outage_grace_s: float
) -> AsyncIterator[JobStatus | Delta | None]:
    items: asyncio.Queue[JobStatus | Delta | _Done | None] = asyncio.Queue()
    final: list[JobStatus] = []  # the finished status, held until the text is all out

    async def status_items() -> None:
        watching = watch(statuses, job_id, heartbeat_s=HEARTBEAT_S, after=cursor.status, outage_grace_s=outage_grace_s)
        async for status in watching:
            if status is not None and status.state.finished:
                final.append(status)
            else:
                items.put_nowait(status)

    async def delta_items() -> None:
        async for entry in follow(deltas, statuses, job_id, cursor.delta or START):
            if isinstance(entry, Delta):
                items.put_nowait(entry)

    tasks = [asyncio.ensure_future(status_items()), asyncio.ensure_future(delta_items())]
    running = len(tasks)

    def one_done(_: asyncio.Future[None]) -> None:
        nonlocal running
        running -= 1
        if not running:
            items.put_nowait(_Done())

    for task in tasks:
        task.add_done_callback(one_done)
    try:
        while not isinstance(item := await items.get(), _Done):
            yield item
        for task in tasks:
            task.result()  # a Redis failure of either side ends the stream (open_streams: `interrupted`)
        for status in final:
            yield status
    finally:
        for task in tasks:
            task.cancel()
