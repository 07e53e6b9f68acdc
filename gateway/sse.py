"""Watching a job's status without blocking the event loop, and Server-Sent Events of it.

`watch` is the asyncio loop over tasks/waiting.py, as `Client.wait` is the sync one: it subscribes to
`varco:events` before it reads the record, so no change slips between; it yields the current status first,
then every newer one, until the job is finished. It re-reads the record every second as well, so a missed
event only delays it, and rides out a Redis outage as `Client.wait` does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import redis

from varco.gateway.public_view import public_status
from varco.tasks.async_status import AsyncEventFeed, AsyncStatusStore
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


async def event_stream(statuses: AsyncStatusStore, job_id: str) -> AsyncIterator[bytes]:
    """`text/event-stream` frames: one `status` event per change (JSON of the status), then the end."""
    async for status in watch(statuses, job_id, heartbeat_s=HEARTBEAT_S):
        if status is None:
            yield b": keep-alive\n\n"
            continue
        event_id = status.updated_at.isoformat() if status.updated_at else ""
        data = public_status(status).model_dump_json()  # issue 21: gateway URLs, not store URIs
        yield f"event: status\nid: {event_id}\ndata: {data}\n\n".encode()
