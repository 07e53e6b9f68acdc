"""The gateway's open event streams: a cap per API key, and a clean end for each when it cannot go on.

Both kinds of stream (`/v1/jobs/{id}/events` and a streamed chat completion) hold gateway resources for
as long as they are open (a feed of the process's one events subscription; for a job with streamed text, a
Redis connection blocked on its deltas), so one key may hold at most VARCO_GATEWAY_MAX_STREAMS_PER_KEY of
them in this process (over it: 429 `too-many-streams`). A stream ends with its own last event, the client's hang-up,
or one of two interruptions, each written as the stream's own kind of last event before the chunked body
is ended properly, so no client sees a truncated transfer:
- `shutdown`: the gateway got SIGTERM (`GatewayServer` calls `close_all`), so uvicorn's graceful shutdown
  no longer waits for open streams, nor cuts them off at its timeout;
- `broker-unavailable`: Redis failed the stream (after the ride-out its watch allows).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.exceptions
from fastapi.responses import StreamingResponse

from varco.gateway.problems import Problem
from varco.tasks.connections import BrokerUnavailable

log = logging.getLogger(__name__)
SHUTDOWN, BROKER_UNAVAILABLE = "shutdown", "broker-unavailable"  # the reasons a stream is interrupted
RETRY_AFTER_S = 5  # a stream lasts as long as its job: a guess at when one of the key's streams has ended
BROKER_ERRORS = (redis.exceptions.RedisError, BrokerUnavailable, OSError)
Interrupted = Callable[[str, str], bytes]  # (reason, detail) -> the stream's last event


class OpenStreams:
    """The streams open in this gateway process, counted per API key (`who`)."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self.open: Counter[str] = Counter()
        self.closing = asyncio.Event()  # set once: every stream ends with `interrupted` (shutdown)

    def reserve(self, who: str) -> Callable[[], None]:
        """One more stream for `who`, or 429 `too-many-streams`; returns its release (idempotent)."""
        if self.open[who] >= self.per_key:
            raise Problem(
                429, "too-many-streams",
                f"this key has {self.open[who]} event streams open in this gateway; the limit is {self.per_key} "
                "(VARCO_GATEWAY_MAX_STREAMS_PER_KEY): close one, or poll GET /v1/jobs/{id}",
                headers={"Retry-After": str(RETRY_AFTER_S)}, limit=self.per_key,
            )  # fmt: skip
        self.open[who] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open[who] -= 1
                if self.open[who] <= 0:
                    del self.open[who]

        return release

    def close_all(self) -> None:
        """The gateway is shutting down: each open stream sends its `interrupted` event and ends."""
        self.closing.set()

    async def guarded(self, events: AsyncIterator[bytes], interrupted: Interrupted) -> AsyncIterator[bytes]:
        """`events` until they end; or `interrupted(reason, detail)` as the last event instead, at shutdown
        or when Redis fails the stream. A stream open when shutdown begins ends at once, as does one opened
        after it."""
        closing = asyncio.ensure_future(self.closing.wait())
        step: asyncio.Future[bytes] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(events))
                await asyncio.wait({step, closing}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # shutdown: end the events inside their own task first (their finally runs)
                    await stop_future(step)
                    yield interrupted(SHUTDOWN, "the gateway is shutting down")
                    return
                try:
                    frame = step.result()
                except StopAsyncIteration:
                    return
                except BROKER_ERRORS as exc:
                    log.warning("an event stream lost Redis: %s: %s", type(exc).__name__, exc)
                    yield interrupted(BROKER_UNAVAILABLE, f"Redis is unavailable: {type(exc).__name__}: {exc}")
                    return
                yield frame
        finally:
            closing.cancel()
            # The caller hung up (this generator is cancelled or closed): the events end in a task of their
            # own, since the hang-up's cancellation would cut their cleanup short here.
            stopping = stop_future(step) if step is not None and not step.done() else _aclose(events)
            _closing.add(task := asyncio.ensure_future(stopping))
            task.add_done_callback(_closing.discard)


_closing: set[asyncio.Future[Any]] = set()  # streams being ended (a reference, so they are not collected)


async def stop_future(step: asyncio.Future[Any]) -> None:
    """Cancel `step` and wait until it ends; asked again while it runs on: redis.asyncio's reads under a
    timeout can swallow one cancellation (it meets their own timeout and reads as "no message yet")."""
    while not step.done():
        step.cancel()
        await asyncio.wait({step}, timeout=0.5)
    if not step.cancelled():
        step.exception()  # retrieved: a failure nobody waits for any more is not logged as unhandled


async def _aclose(events: AsyncIterator[bytes]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


class HeldStream(StreamingResponse):
    """A StreamingResponse that gives its stream's slot back however it ends, even when the client left
    before the body began (then its generator never runs, and no `finally` in it would)."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
