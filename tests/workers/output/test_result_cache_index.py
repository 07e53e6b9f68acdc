"""The result cache's index on a real redis-server: which jobs repeat one another, TTL, unreadable sources."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from varco.tasks.keys import RESULT_CACHE_PREFIX
from varco.tasks.requests import JobRequest
from varco.tasks.results_store import FileResultStore
from varco.tasks.schemas import ImageInfo, JobResult, JobState, ParsedOutput
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import LocalRedis, start_redis
from varco.workers.output.result_cache import ResultCache

SHA = "ab" * 32


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with start_redis(tmp_path_factory.mktemp("redis-cache")) as s:
        yield s


@pytest.fixture
def client(server: LocalRedis) -> redis.Redis:
    c = redis.Redis.from_url(server.url, decode_responses=True)
    c.flushdb()
    return c


def cache(client: redis.Redis, tmp_path: Path, ttl: int = 600, **settings: object) -> ResultCache:
    store = FileResultStore((tmp_path / "results").as_uri() + "/")
    return ResultCache(
        client, store, Settings(**{"result_cache_ttl": ttl, "model": "m", "max_new_tokens": 64} | settings)
    )


def stored(c: ResultCache, job_id: str, finished_at: datetime | None = None) -> str:
    result = JobResult(
        job_id=job_id, task="grounding", state=JobState.SUCCEEDED, model="m", prompt="<gro>\nx",
        image=ImageInfo(uri="u", width=1, height=1, sha256=SHA), output=ParsedOutput(raw="r", text="r"),
        finished_at=finished_at or datetime.now(UTC),
    )  # fmt: skip
    return c.store.write(job_id, result.model_dump_json().encode())


def test_every_field_of_the_contract_is_in_the_key(client: redis.Redis, tmp_path: Path) -> None:
    c = cache(client, tmp_path)
    base = {"image_uri": "https://a/b.png", "task": "referring", "region": (0.1, 0.1, 0.5, 0.5), "label": "cup"}
    key = c.key(JobRequest(**base), SHA)
    assert key.startswith(RESULT_CACHE_PREFIX)
    variants = [
        c.key(JobRequest(**base), "cd" * 32),
        c.key(JobRequest(**base | {"region": (0.1, 0.1, 0.5, 0.6)}), SHA),
        c.key(JobRequest(**base | {"label": "mug"}), SHA),
        c.key(JobRequest(**base | {"prompt": "what is it?"}), SHA),
        c.key(JobRequest(**base | {"max_new_tokens": 65}), SHA),
        c.key(JobRequest(image_uri="https://a/b.png", task="grounding"), SHA),
        cache(client, tmp_path, model="other").key(JobRequest(**base), SHA),
    ]
    assert key not in variants and len(set(variants)) == len(variants)
    # What does not change the answer does not change the key: the URI, metadata, and a budget equal to the default.
    same = {"image_uri": "s3://x/y.png", "metadata": {"n": 1}, "callback_url": "https://h/k", "max_new_tokens": 64}
    assert c.key(JobRequest(**base | same), SHA) == key


def test_remember_then_lookup_and_the_ttl(client: redis.Redis, tmp_path: Path) -> None:
    c = cache(client, tmp_path, ttl=600)
    request = JobRequest(image_uri="https://a/b.png", task="grounding")
    assert c.lookup(request, SHA) is None
    c.remember(request, SHA, "src", stored(c, "src"))
    assert c.lookup(request, SHA).job_id == "src"
    assert 590 <= client.ttl(c.key(request, SHA)) <= 600  # Redis drops the entry after the TTL
    client.delete(c.key(request, SHA))
    # An entry whose source finished longer ago than the TTL (left from a longer TTL) is a miss.
    c.remember(request, SHA, "old", stored(c, "old", datetime.now(UTC) - timedelta(seconds=601)))
    assert c.lookup(request, SHA) is None
    # So is one whose result was deleted.
    c.remember(request, SHA, "gone", c.store.uri_for("gone"))
    assert c.lookup(request, SHA) is None


def test_ttl_zero_is_off(client: redis.Redis, tmp_path: Path) -> None:
    c = cache(client, tmp_path, ttl=0)
    request = JobRequest(image_uri="https://a/b.png", task="grounding")
    c.remember(request, SHA, "src", stored(c, "src"))
    assert c.lookup(request, SHA) is None and client.keys(RESULT_CACHE_PREFIX + "*") == []
