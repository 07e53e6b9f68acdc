"""The result cache through a live `varco worker` with VARCO_RESULT_CACHE_TTL set: repeats use no inference."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import running_worker
from test_node_endpoint import base, node_env, scrape, value, wait_http

from varco.producer import Client
from varco.tasks.keys import RESULT_CACHE_PREFIX
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import LocalRedis

CACHE_DB = 12  # a Redis database of its own: no other test worker takes these jobs


@pytest.fixture(scope="module")
def cache_node(worker_env: dict, redis_server: LocalRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    env = node_env(worker_env, redis_server, CACHE_DB, VARCO_RESULT_CACHE_TTL="3600")
    with running_worker(env, tmp_path_factory.mktemp("cache-node") / "worker.log"):
        wait_http(base(env) + "/readyz", lambda r: r.status_code == 200)
        yield env


@pytest.fixture(scope="module")
def cache_client(cache_node: dict) -> Iterator[Client]:
    client = Client(settings_from_env(cache_node))
    yield client
    client.close()


def settled(env: dict, name: str, expected: float, **labels: str) -> dict:
    """Metrics once `name` reads `expected` (a worker counts a job just after its record says succeeded)."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(env)
        if value(samples, name, **labels) == expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def wait_indexed(client: Client, *job_ids: str) -> None:
    """Until the cache names these jobs: a worker indexes a result just after its job reads succeeded, so a
    repeat sent the moment the source finished may find nothing yet (and rightly run inference)."""
    deadline = time.monotonic() + 30
    while True:
        entries = [client.redis.get(key) for key in client.redis.scan_iter(RESULT_CACHE_PREFIX + "*")]
        named = {json.loads(entry)["job_id"] for entry in entries if entry is not None}
        if set(job_ids) <= named:
            return
        assert time.monotonic() < deadline, f"{job_ids} never indexed; the cache names {named}"
        time.sleep(0.05)


def test_a_repeat_is_answered_from_the_cache_without_inference(
    cache_node: dict, cache_client: Client, http_files, file_root: Path
) -> None:
    url = http_files.base + "/cat.png"
    source = cache_client.result(cache_client.submit(url, "grounding", max_new_tokens=1024), timeout=120)
    assert source.cached_from is None and source.timings.inference_s > 0 and source.usage.output_tokens > 0
    before = settled(cache_node, "varco_jobs_total", 1, task="grounding", state="succeeded")
    assert value(before, "varco_tokens_total", kind="output") == source.usage.output_tokens
    wait_indexed(cache_client, source.job_id)

    # The same bytes from another URI, with other metadata: still the same question.
    repeats = [
        cache_client.submit(url, "grounding", max_new_tokens=1024, metadata={"n": 2}),
        cache_client.submit((file_root / "cat.png").as_uri(), "grounding", max_new_tokens=1024),
    ]
    for job_id in repeats:
        result = cache_client.result(job_id, timeout=120)
        assert result.job_id == job_id and result.cached_from == source.job_id
        assert result.timings.inference_s == 0 and result.usage.output_tokens == 0
        assert result.output == source.output and result.prompt == source.prompt
        assert result.image.sha256 == source.image.sha256 and result.image.kept_uri.endswith(f"{job_id}.image")
    assert cache_client.result(repeats[0]).metadata == {"n": 2}
    assert cache_client.result(repeats[1]).image.uri == (file_root / "cat.png").as_uri()

    after = settled(cache_node, "varco_jobs_total", 3, task="grounding", state="succeeded")
    for name, labels in [
        ("varco_tokens_total", {"kind": "output"}),
        ("varco_tokens_total", {"kind": "prompt"}),
        ("varco_engine_busy_seconds_total", {}),
        ("varco_batch_size_count", {}),  # every request the engine ran
        ("varco_job_duration_seconds_count", {"task": "grounding", "phase": "inference"}),
    ]:
        assert value(after, name, **labels) == value(before, name, **labels), name  # no inference ran
    assert value(after, "varco_result_cache_lookups_total", outcome="hit") == 2


def test_a_different_prompt_budget_region_or_task_is_not_answered_from_the_cache(
    cache_client: Client, http_files
) -> None:
    url = http_files.base + "/cat.png"
    first = [
        cache_client.submit(url, "caption", prompt="What is red?"),
        cache_client.submit(url, "referring", region=[0.1, 0.1, 0.5, 0.5], label="a"),
    ]
    assert {s.state.value for s in cache_client.wait(first, timeout=120)} == {"succeeded"}
    wait_indexed(cache_client, *first)
    variants = [
        cache_client.submit(url, "caption", prompt="What is blue?"),
        cache_client.submit(url, "caption", prompt="What is red?", max_new_tokens=8),
        cache_client.submit(url, "vqa", prompt="What is red?"),
        cache_client.submit(url, "referring", region=[0.1, 0.1, 0.5, 0.6], label="a"),
        cache_client.submit(url, "referring", region=[0.1, 0.1, 0.5, 0.5], label="b"),
    ]
    for job_id in variants:
        result = cache_client.result(job_id, timeout=120)
        assert result.cached_from is None and result.usage.output_tokens > 0, (job_id, result.task)
    # The control: the same question again is a hit.
    assert cache_client.result(cache_client.submit(url, "caption", prompt="What is red?"), 120).cached_from == first[0]


def test_an_expired_entry_is_not_used(cache_client: Client, http_files) -> None:
    url = http_files.base + "/cat.png"
    source = cache_client.result(cache_client.submit(url, "vqa", prompt="Expiring?"), timeout=120)
    wait_indexed(cache_client, source.job_id)
    index = redis.Redis.from_url(cache_client.settings.broker_url)
    keys = list(index.scan_iter(RESULT_CACHE_PREFIX + "*"))
    assert keys
    for key in keys:  # as if the TTL had run out
        index.pexpire(key, 1)
    deadline = time.monotonic() + 30
    while any(index.exists(k) for k in keys) and time.monotonic() < deadline:
        time.sleep(0.05)
    again = cache_client.result(cache_client.submit(url, "vqa", prompt="Expiring?"), timeout=120)
    assert again.cached_from is None and again.usage.output_tokens > 0
    wait_indexed(cache_client, again.job_id)
    # That run indexed its own result: the next repeat names it, not the expired source.
    third = cache_client.result(cache_client.submit(url, "vqa", prompt="Expiring?"), timeout=120)
    assert third.cached_from == again.job_id != source.job_id


def test_ttl_zero_never_caches(client: Client, http_files) -> None:
    # The session worker runs with the default VARCO_RESULT_CACHE_TTL=0.
    url = http_files.base + "/cat.png"
    jobs = [client.submit(url, "vqa", prompt="Cached with TTL 0?") for _ in range(2)]
    results = [client.result(job_id, timeout=120) for job_id in jobs]
    assert [r.cached_from for r in results] == [None, None]
    assert all(r.usage.output_tokens > 0 for r in results)
    assert list(client.redis.scan_iter(RESULT_CACHE_PREFIX + "*")) == []
