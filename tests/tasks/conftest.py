"""Fixtures of the tests of `tasks/` that talk to Redis: a private redis-server per test module, and a
StatusStore on it, emptied for each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from varco.tasks.status import StatusStore
from varco.workers.devtools.local_redis import LocalRedis, start_redis


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with start_redis(tmp_path_factory.mktemp("redis")) as s:
        yield s


@pytest.fixture
def store(server: LocalRedis) -> StatusStore:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    return StatusStore(client, ttl=120)
