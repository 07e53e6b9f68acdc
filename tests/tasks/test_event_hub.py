"""The gateway's one subscription to `varco:events` per process (`EventHub`), on a real redis-server: many
waits share it, each hears its own job, it subscribes again by itself, and a feed made while it is down
reports the outage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from varco.gateway import sse
from varco.tasks import async_status
from varco.tasks.async_status import AsyncStatusStore
from varco.tasks.schemas import JobState, JobStatus
from varco.tasks.status import EVENTS_CHANNEL, StatusStore
from varco.workers.devtools.local_redis import LocalRedis, free_port

WAITS = 300  # three times redis-py's pool of 100 connections


def statuses_of(server: LocalRedis) -> AsyncStatusStore:
    return AsyncStatusStore(aioredis.Redis.from_url(server.url, decode_responses=True))


def subscribers(store: StatusStore) -> int:
    return store.redis.pubsub_numsub(EVENTS_CHANNEL)[0][1]


def test_300_waits_share_one_subscription_and_each_hears_its_own_job(server: LocalRedis, store: StatusStore) -> None:
    jobs = [f"job-{i}" for i in range(WAITS)]
    for job in jobs:
        store.create(job, "caption")

    async def run() -> tuple[list[JobState], list[list[JobStatus | None]], int]:
        statuses = statuses_of(server)
        try:
            watches = [sse.watch(statuses, job, timeout=600) for job in jobs]
            # Each watch yields the record it read after subscribing: all 300 are listening now.
            firsts = await asyncio.gather(*(anext(w) for w in watches))
            assert all(s is not None and s.state is JobState.QUEUED for s in firsts)
            numsub = await asyncio.to_thread(subscribers, store)
            for i, job in enumerate(jobs):  # every job's end goes to every subscriber; each wait needs its own
                state = JobState.SUCCEEDED if i % 2 else JobState.FAILED
                await asyncio.to_thread(store.transition, job, state)
            ends = [[s async for s in w] for w in watches]
            return [s.state for s in firsts if s is not None], ends, numsub
        finally:
            await statuses.aclose()

    _, ends, numsub = asyncio.run(run())
    assert numsub == 1  # one subscriber for 300 waits (one per wait before: 300, or MaxConnectionsError)
    for i, (job, rest) in enumerate(zip(jobs, ends, strict=True)):
        assert [(s.job_id, s.state) for s in rest if s is not None] == [
            (job, JobState.SUCCEEDED if i % 2 else JobState.FAILED)
        ]
    assert subscribers(store) == 0  # the hub's subscription ended with the store


def test_feeds_hear_only_their_own_job_and_a_slow_reader_is_bounded(server: LocalRedis, store: StatusStore) -> None:
    async def run() -> None:
        statuses = statuses_of(server)
        try:
            a, a2, b = await statuses.events("a"), await statuses.events("a"), await statuses.events("b")
            for job in ("b", "a"):
                await asyncio.to_thread(store.create, job, "ocr")
                await asyncio.to_thread(store.begin_attempt, job, "gpu0@a", 3)  # published
            for feed in (a, a2):
                heard = await feed.next(5.0)
                assert heard is not None and heard.job_id == "a" and not feed.resubscribed()
            heard = await b.next(5.0)
            assert heard is not None and heard.job_id == "b" and await b.next(0.0) is None
            # `a` is not read while its job changes more often than the feed holds: the oldest are dropped
            # and the feed says so, so its watch reads the record instead.
            await a2.aclose()
            started = json.dumps(await asyncio.to_thread(store.record, "a"))  # as the Lua scripts publish it
            for _ in range(async_status.FEED_QUEUE + 5):
                await asyncio.to_thread(store.redis.publish, EVENTS_CHANNEL, started)
            await asyncio.to_thread(store.transition, "a", JobState.SUCCEEDED)
            await asyncio.to_thread(store.transition, "b", JobState.SUCCEEDED)
            assert await b.next(5.0) is not None  # the hub routes in order: `a`'s events are all in its feed now
            got = [await a.next(0.0) for _ in range(async_status.FEED_QUEUE)]
            assert await a.next(0.0) is None and a.resubscribed() and not a.resubscribed()
            assert [s.state for s in got if s is not None][-2:] == [JobState.STARTED, JobState.SUCCEEDED]
            for feed in (a, b):
                await feed.aclose()
            assert statuses.hub.watched == 0
        finally:
            await statuses.aclose()

    asyncio.run(run())


def test_a_killed_subscription_comes_back_and_the_wait_reads_the_end_it_missed(
    server: LocalRedis, store: StatusStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create("k", "caption")
    store.begin_attempt("k", "gpu0@a", 3)
    reads: list[str] = []
    real_get = AsyncStatusStore.get

    async def counted_get(self: AsyncStatusStore, job_id: str) -> JobStatus | None:
        reads.append(job_id)
        return await real_get(self, job_id)

    monkeypatch.setattr(AsyncStatusStore, "get", counted_get)

    async def run() -> list[JobStatus | None]:
        # The hub's subscribing again (by redis-py's reconnect, or its own) is held until the end is published.
        gate, reconnecting = asyncio.Event(), asyncio.Event()
        real_execute = aioredis.client.PubSub.execute_command
        subscribes = 0

        async def held_execute(self: aioredis.client.PubSub, *args: object) -> None:
            nonlocal subscribes
            if str(args[0]).upper() == "SUBSCRIBE":
                subscribes += 1
                if subscribes > 1:
                    reconnecting.set()
                    await gate.wait()
            await real_execute(self, *args)

        monkeypatch.setattr(aioredis.client.PubSub, "execute_command", held_execute)
        statuses = statuses_of(server)
        try:
            watching: AsyncIterator[JobStatus | None] = sse.watch(statuses, "k", timeout=600)
            first = await anext(watching)
            assert first is not None and first.state is JobState.STARTED
            rest = asyncio.ensure_future(_collect(watching))
            await asyncio.to_thread(store.redis.client_kill_filter, _type="pubsub")
            await reconnecting.wait()
            assert await asyncio.to_thread(subscribers, store) == 0
            await asyncio.to_thread(store.transition, "k", JobState.SUCCEEDED)  # heard by nobody
            gate.set()
            return [first, *await rest]
        finally:
            await statuses.aclose()

    seen = asyncio.run(run())
    assert [s.state for s in seen if s is not None] == [JobState.STARTED, JobState.SUCCEEDED]
    assert reads == ["k", "k"]  # the first read, and the one the resubscribe asked for (not the 30 s reread)


async def _collect(watching: AsyncIterator[JobStatus | None]) -> list[JobStatus | None]:
    return [s async for s in watching]


def test_a_feed_made_while_redis_is_down_raises_connection_error() -> None:
    async def run() -> None:
        statuses = AsyncStatusStore(aioredis.Redis(port=free_port(), socket_connect_timeout=1, retry=None))
        try:
            feed = await statuses.events("x")
            with pytest.raises(redis.ConnectionError):
                await feed.next(1.0)
            await feed.aclose()
        finally:
            await statuses.aclose()
        with pytest.raises(redis.ConnectionError):  # a closed hub (the gateway is shutting down) too
            await statuses.events("y")

    asyncio.run(run())


def test_a_batch_message_reaches_each_of_its_jobs_feeds(server: LocalRedis, store: StatusStore) -> None:
    """A worker's batch of claims or ends is one message, a JSON array: each record goes to its own job's feed."""

    async def run() -> None:
        statuses = statuses_of(server)
        try:
            a, b = await statuses.events("ba"), await statuses.events("bb")
            for job in ("ba", "bb"):
                await asyncio.to_thread(store.create, job, "ocr")
            records = [await asyncio.to_thread(store.record, job) for job in ("bb", "ba")]
            await asyncio.to_thread(store.redis.publish, EVENTS_CHANNEL, json.dumps(records))
            heard_a, heard_b = await a.next(5.0), await b.next(5.0)
            assert heard_a is not None and heard_a.job_id == "ba" and await a.next(0.0) is None
            assert heard_b is not None and heard_b.job_id == "bb" and await b.next(0.0) is None
        finally:
            await statuses.aclose()

    asyncio.run(run())
