"""The gateway's Redis pool holds what uvicorn lets in: each streamed job's reader blocks on a connection of
its own (XREAD of the job's text), and redis-py's asyncio default of 100 connections failed the 101st stream
with MaxConnectionsError, under the gateway's VARCO_GATEWAY_MAX_CONNECTIONS (1000)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from varco.gateway.app import gateway_redis
from varco.tasks.delta_stream import AsyncDeltaStream
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import start_redis

STREAMS = 150  # past redis-py's default pool of 100


def test_more_streams_than_redis_pys_default_pool_read_at_once(tmp_path: Path) -> None:
    async def read_all(url: str) -> list[list]:
        client = gateway_redis(Settings(broker_url=url, _env_file=None))
        deltas = AsyncDeltaStream(client)
        try:  # each blocks 300 ms on a job with no text yet: all 150 hold a connection at the same time
            return await asyncio.gather(*(deltas.read(f"job-{i}", block_ms=300) for i in range(STREAMS)))
        finally:
            await client.aclose()

    with start_redis(tmp_path) as server:
        assert asyncio.run(read_all(server.url)) == [[]] * STREAMS
