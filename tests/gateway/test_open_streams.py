"""open_streams.py without a server: the cap per key, and how a stream ends when it is cut short."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis

from varco.gateway.open_streams import OpenStreams
from varco.gateway.problems import Problem


def test_over_the_cap_a_key_gets_429_too_many_streams_and_a_slot_comes_back_once() -> None:
    streams = OpenStreams(2)
    first, _ = streams.reserve("alice"), streams.reserve("alice")
    streams.reserve("bob")  # each key has its own count
    with pytest.raises(Problem) as refused:
        streams.reserve("alice")
    assert (refused.value.status, refused.value.kind) == (429, "too-many-streams")
    assert int(refused.value.headers["Retry-After"]) > 0 and "VARCO_GATEWAY_MAX_STREAMS_PER_KEY" in refused.value.detail
    first()
    first()  # a release is counted once, however often it is called
    streams.reserve("alice")
    with pytest.raises(Problem):
        streams.reserve("alice")


async def events(closed: list[str], failure: Exception | None = None) -> AsyncIterator[bytes]:
    """One frame, then a wait that never ends on its own (or `failure`)."""
    try:
        yield b"one"
        if failure is not None:
            raise failure
        await asyncio.Event().wait()
        yield b"never"
    finally:
        closed.append("closed")


def interrupted(reason: str, detail: str) -> bytes:
    return f"interrupted: {reason}".encode()


def read(streams: OpenStreams, source: AsyncIterator[bytes], close_after_first: bool = False) -> list[bytes]:
    async def collect() -> list[bytes]:
        frames = []
        async for frame in streams.guarded(source, interrupted):
            frames.append(frame)
            if close_after_first:
                streams.close_all()
        return frames

    return asyncio.run(asyncio.wait_for(collect(), 30))


def test_shutdown_ends_an_open_stream_with_its_interrupted_event_and_closes_its_events() -> None:
    closed: list[str] = []
    assert read(OpenStreams(1), events(closed), close_after_first=True) == [b"one", b"interrupted: shutdown"]
    assert closed == ["closed"]


def test_a_stream_that_loses_redis_ends_with_its_interrupted_event() -> None:
    closed: list[str] = []
    source = events(closed, redis.ConnectionError("Connection refused"))
    assert read(OpenStreams(1), source) == [b"one", b"interrupted: broker-unavailable"]
    assert closed == ["closed"]


def test_a_stream_that_ends_by_itself_is_not_interrupted() -> None:
    async def two() -> AsyncIterator[bytes]:
        yield b"one"
        yield b"two"

    assert read(OpenStreams(1), two()) == [b"one", b"two"]


def test_a_hang_up_while_the_events_wait_closes_them() -> None:
    closed: list[str] = []

    async def hang_up() -> None:
        stream = OpenStreams(1).guarded(events(closed), interrupted)
        assert await anext(stream) == b"one"
        reading = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        reading.cancel()  # what the server does when the client leaves
        with pytest.raises(asyncio.CancelledError):
            await reading
        while not closed:  # the events end in a task of their own
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(hang_up(), 30))
    assert closed == ["closed"]
