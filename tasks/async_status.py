"""The status records for asyncio code (the gateway): read a job's status, check its owner, follow its events.

The same records and event channel as `tasks/status.py`, which owns them and does every write (the Lua
scripts); this side only reads, so a waiting HTTP request holds no thread.
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from varco.tasks import keys
from varco.tasks.keys import EVENTS_CHANNEL
from varco.tasks.schemas import JobStatus
from varco.tasks.status import owned_status, parse_event


class CountingAsyncPubSub(PubSub):
    """A subscription that counts its connections (as `status.CountingPubSub`, for asyncio)."""

    connects = 0

    async def on_connect(self, connection: Any) -> None:
        self.connects += 1
        await super().on_connect(connection)


class AsyncEventFeed:
    """The events channel, subscribed (asyncio), as `AsyncStatusStore.events` opens it."""

    def __init__(self, pubsub: CountingAsyncPubSub) -> None:
        self._pubsub = pubsub
        self._connects = pubsub.connects

    def resubscribed(self) -> bool:
        """Whether the subscription reconnected since the last call (events published meanwhile are lost)."""
        seen, self._connects = self._connects, self._pubsub.connects
        return self._connects != seen

    async def next(self, timeout_s: float) -> JobStatus | None:
        """The next status published, or None: nothing within `timeout_s`, or a message that is no status."""
        message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=max(0.0, timeout_s))
        return parse_event(message["data"]) if message is not None else None

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError):  # closing a feed whose Redis went away is no error
            await self._pubsub.aclose()


class AsyncStatusStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def get(self, job_id: str) -> JobStatus | None:
        return await self.get_owned(job_id, None)

    async def get_owned(self, job_id: str, owner: str | None) -> JobStatus | None:
        """The status if the job exists and `owner` submitted it (None: anyone's); else None, the same answer
        as for an unknown job, so ids cannot be probed across owners."""
        return owned_status(await self.redis.hgetall(keys.job(job_id)), owner)

    async def events(self) -> AsyncEventFeed:
        """Subscribe to every status change; subscribe before reading records, so no change slips between."""
        pubsub = CountingAsyncPubSub(self.redis.connection_pool, ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(EVENTS_CHANNEL)
        except BaseException:
            await AsyncEventFeed(pubsub).aclose()
            raise
        return AsyncEventFeed(pubsub)

    async def ping(self) -> None:
        """Raises unless Redis answers (the gateway's /readyz)."""
        await self.redis.ping()

    async def aclose(self) -> None:
        await self.redis.aclose()
