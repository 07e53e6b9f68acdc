"""Watching a job's status without blocking the event loop, and Server-Sent Events of it.

`watch` subscribes to `varco:events` (redis.asyncio) before it reads the record, so no change slips
between; it yields the current status first, then every newer one, until the job is finished. Like
`Client.wait`, it re-reads the record every second as well, so a missed event only delays it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import redis.asyncio as aioredis

from varco.gateway.public_view import public_status
from varco.tasks.schemas import JobState, JobStatus
from varco.tasks.status import EVENTS_CHANNEL, StatusStore, parse_event, record_to_status

POLL_INTERVAL_S = 1.0
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
_RANK = {JobState.QUEUED: 0, JobState.STARTED: 1, JobState.RETRYING: 1}
_EPOCH = datetime.min.replace(tzinfo=UTC)


def _order(status: JobStatus) -> tuple[datetime, int]:
    return status.updated_at or _EPOCH, _RANK.get(status.state, 2)


async def watch(
    redis: aioredis.Redis, statuses: StatusStore, job_id: str, *, timeout: float | None = None,
    heartbeat_s: float | None = None,
) -> AsyncIterator[JobStatus | None]:  # fmt: skip
    """Yield the job's status now and at every change until it is finished (or `timeout` passes).

    With `heartbeat_s`, yields None after that long without a change (the caller sends a keep-alive).
    Ends early if the record disappears (expired)."""
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(EVENTS_CHANNEL)
    try:
        last: JobStatus | None = None
        last_yield = start
        next_poll = 0.0
        while True:
            now = time.monotonic()
            status: JobStatus | None = None
            if now >= next_poll:
                record = await redis.hgetall(statuses.key(job_id))
                if not record:
                    return
                status = record_to_status(record)
                next_poll = now + POLL_INTERVAL_S
            else:
                if deadline is not None and now >= deadline:
                    return
                wait_s = next_poll - now if deadline is None else min(next_poll, deadline) - now
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=max(0.0, wait_s))
                if message is not None:
                    event = parse_event(message["data"])
                    if event is not None and event.job_id == job_id:
                        status = event
            # Events buffered before the first read can be older than it: only move forward.
            if status is not None and (last is None or _order(status) > _order(last)):
                last, last_yield = status, time.monotonic()
                yield status
                if status.state.finished:
                    return
            elif heartbeat_s is not None and time.monotonic() - last_yield >= heartbeat_s:
                last_yield = time.monotonic()
                yield None
    finally:
        await pubsub.aclose()


async def event_stream(redis: aioredis.Redis, statuses: StatusStore, job_id: str) -> AsyncIterator[bytes]:
    """`text/event-stream` frames: one `status` event per change (JSON of the status), then the end."""
    async for status in watch(redis, statuses, job_id, heartbeat_s=HEARTBEAT_S):
        if status is None:
            yield b": keep-alive\n\n"
            continue
        event_id = status.updated_at.isoformat() if status.updated_at else ""
        data = public_status(status).model_dump_json()  # issue 21: gateway URLs, not store URIs
        yield f"event: status\nid: {event_id}\ndata: {data}\n\n".encode()
