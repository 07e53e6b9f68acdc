"""The status records for asyncio code (the gateway): read a job's status, check its owner, follow its events.

The same records and event channel as `tasks/status.py`, which owns them and does every write (the Lua
scripts); this side only reads, so a waiting HTTP request holds no thread. Waiting requests share one subscription
to the events channel per process (`EventHub`), each fed its own job's statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from varco.tasks import keys
from varco.tasks.keys import EVENTS_CHANNEL
from varco.tasks.schemas import JobStatus
from varco.tasks.status import decode_record, is_wrong_type, owned_status, parse_events

log = logging.getLogger(__name__)

FEED_QUEUE = 100
"""Statuses a feed holds unread; past it the oldest is dropped and the feed says `resubscribed` (read again)."""
RECONNECT_S = (0.1, 2.0)
"""The hub's pause after a failed subscription: the first, doubled up to the last."""


class _FeedLost(redis.ConnectionError):
    """Raised by a feed's `next` while the hub has no subscription (watch rides it out as an outage)."""


class HubFeed:
    """One job's events from the process's `EventHub`: the interface `gateway/sse.watch` reads."""

    def __init__(self, hub: EventHub, job_id: str) -> None:
        self._hub, self.job_id = hub, job_id
        self._items: deque[JobStatus] = deque()
        self._wake = asyncio.Event()
        self._seen = hub.subscriptions  # which subscription this feed has heard all events of
        self._dropped = False
        self.closed = False

    def _push(self, status: JobStatus) -> None:
        if len(self._items) >= FEED_QUEUE:  # a waiter that does not read: bounded, it reads the record instead
            self._items.popleft()
            self._dropped = True
        self._items.append(status)
        self._wake.set()

    def _nudge(self) -> None:
        """Wake a `next` in progress: the hub subscribed again, or lost its subscription."""
        self._wake.set()

    def resubscribed(self) -> bool:
        """True once after the hub subscribed again since the last call, or this feed dropped statuses:
        events may have been missed, so the caller reads the record."""
        missed = self._dropped or self._seen != self._hub.subscriptions
        self._seen, self._dropped = self._hub.subscriptions, False
        return missed

    async def next(self, timeout_s: float) -> JobStatus | None:
        """The job's next status published, or None within `timeout_s` (or when woken to ask
        `resubscribed`). Raises redis.ConnectionError while the hub has no subscription."""
        if not self._items:
            self._hub.check_subscribed()
            if self._dropped or self._seen != self._hub.subscriptions:
                return None  # a resubscribe (or a drop) the caller has not asked about yet: it reads first
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, timeout_s)):
                    await self._wake.wait()
            if not self._items:
                self._hub.check_subscribed()
                return None
        return self._items.popleft()

    async def aclose(self) -> None:
        self._hub.forget(self)
        self.closed = True


class EventHub:
    """One subscription to `varco:events` per process, fanned out to the feeds of the jobs watched.

    A subscription per waiting request cost a pooled connection each (redis-py's pool holds 100: the
    gateway answered 503 past ~100 open waits), and Redis one socket write per waiter for every event of
    every job. The hub subscribes once (lazily, on the first feed), routes each status to the feeds of its
    job, and subscribes again by itself after losing Redis; every live feed then says `resubscribed`."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._feeds: dict[str, set[HubFeed]] = {}
        self.subscriptions = 0  # subscriptions confirmed so far (a feed compares it to tell a reconnect)
        self._down: BaseException | None = None  # why there is no subscription now (None: subscribed)
        self._settled = asyncio.Event()  # the first attempt to subscribe has ended, either way
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def feed(self, job_id: str) -> HubFeed:
        """A feed of `job_id`'s statuses, registered (and the hub subscribed, when Redis answers) before
        it is returned, so a record read after it misses no change."""
        if self._closed:
            raise _FeedLost("the event hub is closed (the gateway is shutting down)")
        feed = HubFeed(self, job_id)
        self._feeds.setdefault(job_id, set()).add(feed)
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        await self._settled.wait()
        feed._seen = self.subscriptions  # a feed made while down says `resubscribed` once it is back
        return feed

    def forget(self, feed: HubFeed) -> None:
        feeds = self._feeds.get(feed.job_id)
        if feeds is not None:
            feeds.discard(feed)
            if not feeds:
                del self._feeds[feed.job_id]

    def check_subscribed(self) -> None:
        if self._down is not None:
            raise _FeedLost(f"the events subscription is down: {type(self._down).__name__}: {self._down}")

    @property
    def watched(self) -> int:
        """Feeds open now."""
        return sum(len(feeds) for feeds in self._feeds.values())

    def _nudge_all(self) -> None:
        for feeds in self._feeds.values():
            for feed in feeds:
                feed._nudge()

    async def _run(self) -> None:
        pause = RECONNECT_S[0]
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(EVENTS_CHANNEL)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":  # confirmed (again, after redis-py reconnected it)
                        self.subscriptions += 1
                        self._down, pause = None, RECONNECT_S[0]
                        self._settled.set()
                        self._nudge_all()  # each waiter asks `resubscribed` and reads its record
                    elif message["type"] == "message":
                        self._route(message["data"])
            except Exception as exc:  # Redis lost, or anything unforeseen: the hub must not die silently
                if not isinstance(exc, (RedisError, OSError)):
                    log.exception("the events subscription failed; subscribing again")
                elif self._down is None:
                    log.warning("the events subscription lost Redis: %s: %s", type(exc).__name__, exc)
                self._down = exc
                self._settled.set()
                self._nudge_all()  # waiters see the outage (watch rides it out)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECONNECT_S[1])

    def _route(self, data: Any) -> None:
        for status in parse_events(data):  # one record, or a worker batch's records
            for feed in self._feeds.get(status.job_id, ()):
                feed._push(status)

    async def aclose(self) -> None:
        """End the subscription (the gateway's shutdown); feeds still open raise ConnectionError."""
        self._closed = True
        self._down = self._down or redis.ConnectionError("the event hub is closed")
        self._nudge_all()
        if self._task is not None:
            while not self._task.done():  # redis.asyncio reads can swallow a cancellation: ask again
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=0.5)


class AsyncStatusStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self.hub = EventHub(client)  # one subscription to the events channel for all of this process's waits

    async def get(self, job_id: str) -> JobStatus | None:
        return await self.get_owned(job_id, None)

    async def get_owned(self, job_id: str, owner: str | None) -> JobStatus | None:
        """The status if the job exists and `owner` submitted it (None: anyone's); else None, the same answer
        as for an unknown job, so ids cannot be probed across owners."""
        key = keys.job(job_id)
        try:
            record = decode_record(await self.redis.get(key))
        except ResponseError as exc:
            if not is_wrong_type(exc):
                raise
            record = await self.redis.hgetall(key)  # the hash layout (a rolling upgrade)
        return owned_status(record, owner)

    async def events(self, job_id: str) -> HubFeed:
        """Follow one job's status changes; subscribed before it returns, so read the record after it and
        no change slips between. All feeds share the process's one subscription (`EventHub`)."""
        return await self.hub.feed(job_id)

    async def ping(self) -> None:
        """Raises unless Redis answers (the gateway's /readyz)."""
        await self.redis.ping()

    async def aclose(self) -> None:
        await self.hub.aclose()
        await self.redis.aclose()
