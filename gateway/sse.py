"""Watching a job's status without blocking the event loop, and Server-Sent Events of it.

`watch` is the asyncio loop over tasks/waiting.py, as `Client.wait` is the sync one: it subscribes to
`varco:events` before it reads the record, so no change slips between; it yields the current status first,
then every newer one, until the job is finished. It re-reads the record every second as well, so a missed
event only delays it, and rides out a Redis outage as `Client.wait` does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import redis

from varco.gateway.job_deltas import follow
from varco.gateway.public_view import public_status
from varco.tasks.async_status import AsyncEventFeed, AsyncStatusStore
from varco.tasks.delta_stream import AsyncDeltaStream, Delta
from varco.tasks.schemas import JobStatus
from varco.tasks.waiting import Follow, Listen, Read, TimedOut, WaitPlan

HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream


async def watch(
    statuses: AsyncStatusStore, job_id: str, *, timeout: float | None = None, heartbeat_s: float | None = None
) -> AsyncIterator[JobStatus | None]:
    """Yield the job's status now and at every change until it is finished (or `timeout` passes).

    With `heartbeat_s`, yields None after that long without a change (the caller sends a keep-alive).
    Ends early if the record disappears (expired)."""
    plan = WaitPlan(time.monotonic(), timeout)
    follow = Follow(job_id, time.monotonic(), heartbeat_s)
    feed: AsyncEventFeed | None = await statuses.events()
    try:
        while not follow.finished:
            status: JobStatus | None = None
            try:
                if feed is None:
                    feed = await statuses.events()
                match plan.next_step(time.monotonic()):
                    case Read():
                        status = await statuses.get(job_id)
                        if status is None:
                            return
                    case Listen(seconds):
                        status = await feed.next(seconds)
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
                yield news
            elif follow.heartbeat(time.monotonic()):
                yield None
    finally:
        if feed is not None:
            await feed.aclose()


KEEP_ALIVE = b": keep-alive\n\n"


def status_frame(status: JobStatus) -> bytes:
    event_id = status.updated_at.isoformat() if status.updated_at else ""
    data = public_status(status).model_dump_json()  # issue 21: gateway URLs, not store URIs
    return f"event: status\nid: {event_id}\ndata: {data}\n\n".encode()


def delta_frame(delta: Delta) -> bytes:
    return f"event: delta\nid: {delta.id}\ndata: {json.dumps({'text': delta.text}, ensure_ascii=False)}\n\n".encode()


async def event_stream(
    statuses: AsyncStatusStore, job_id: str, deltas: AsyncDeltaStream | None = None
) -> AsyncIterator[bytes]:
    """`text/event-stream` frames: one `status` event per change (JSON of the status), then the end. A job
    submitted with `stream: true` has a `delta` event (`{"text": ...}`) for each piece of its answer too, and
    its final status comes after its last text."""
    if deltas is not None and await deltas.is_open(job_id):
        async for frame in _with_deltas(statuses, deltas, job_id):
            yield frame
        return
    async for status in watch(statuses, job_id, heartbeat_s=HEARTBEAT_S):
        yield KEEP_ALIVE if status is None else status_frame(status)


async def _with_deltas(statuses: AsyncStatusStore, deltas: AsyncDeltaStream, job_id: str) -> AsyncIterator[bytes]:
    frames: asyncio.Queue[bytes | None] = asyncio.Queue()
    final: list[bytes] = []  # the finished status, held until the text is all out

    async def status_frames() -> None:
        async for status in watch(statuses, job_id, heartbeat_s=HEARTBEAT_S):
            if status is not None and status.state.finished:
                final.append(status_frame(status))
            else:
                frames.put_nowait(KEEP_ALIVE if status is None else status_frame(status))

    async def delta_frames() -> None:
        async for entry in follow(deltas, statuses, job_id):
            if isinstance(entry, Delta):
                frames.put_nowait(delta_frame(entry))

    tasks = [asyncio.ensure_future(status_frames()), asyncio.ensure_future(delta_frames())]
    running = len(tasks)

    def one_done(_: asyncio.Future[None]) -> None:
        nonlocal running
        running -= 1
        if not running:
            frames.put_nowait(None)

    for task in tasks:
        task.add_done_callback(one_done)
    try:
        while (frame := await frames.get()) is not None:
            yield frame
        for task in tasks:
            task.result()  # a Redis failure of either side ends the response as it would without deltas
        for frame in final:
            yield frame
    finally:
        for task in tasks:
            task.cancel()
