"""VARCO_BROKER_URL=sentinel://…: jobs run through a real master, replica and sentinel, and after the master
is killed and the replica promoted, the worker (inference and webhook children) and the client reconnect
on their own and new jobs succeed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import running_worker
from redis.sentinel import MasterNotFoundError, Sentinel

from varco.gateway.app import gateway_redis
from varco.producer import Client
from varco.tasks.async_status import AsyncStatusStore
from varco.tasks.schemas import JobState, JobStatus
from varco.tasks.settings import Settings, settings_from_env
from varco.workers.devtools.local_redis import LocalRedis, free_port, start_redis, start_replica, start_sentinel

MASTER = "varco-test-master"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def discovered_master_port(sentinel: Sentinel) -> int | None:
    """The master as clients find it: named by a sentinel and flagged up there (not just announced)."""
    try:
        return int(sentinel.discover_master(MASTER)[1])
    except MasterNotFoundError:
        return None


def replica_in_sync(sentinel: redis.Redis) -> bool:
    replicas = sentinel.sentinel_slaves(MASTER)
    return any(r.get("master-link-status") == "ok" and not r.get("is_sdown") for r in replicas)


@pytest.fixture
def redis_ha(tmp_path: Path) -> Iterator[dict[str, LocalRedis]]:
    for name in ("master", "replica", "sentinel"):
        (tmp_path / name).mkdir()
    master = start_redis(tmp_path / "master")
    replica = start_replica(master, tmp_path / "replica")
    # 3 s without an answer is "down": short enough for a quick test, long enough that a busy machine's
    # slow PING is not taken for a dead master.
    sentinel = start_sentinel(master, tmp_path / "sentinel", master_name=MASTER, down_after_ms=3000)
    servers = {"master": master, "replica": replica, "sentinel": sentinel}
    try:
        asker = redis.Redis(port=sentinel.port, decode_responses=True)
        wait_until(lambda: replica_in_sync(asker), "the sentinel seeing an in-sync replica")
        yield servers
    finally:
        for server in servers.values():
            server.stop()


async def read_as_the_gateway_does(settings: Settings, job_id: str) -> JobStatus | None:
    statuses = AsyncStatusStore(gateway_redis(settings))
    try:
        return await statuses.get(job_id)
    finally:
        await statuses.aclose()


def test_jobs_run_through_sentinel_and_survive_a_failover(
    worker_env: dict[str, str], redis_ha: dict[str, LocalRedis], receiver, file_root: Path, tmp_path: Path
) -> None:
    sentinel = redis_ha["sentinel"]
    env = {
        **worker_env,
        "VARCO_BROKER_URL": sentinel.sentinel_url,
        "VARCO_SENTINEL_MASTER": MASTER,
        "VARCO_METRICS_PORT": str(free_port()),
    }
    cat = (file_root / "cat.png").as_uri()
    finder = Sentinel([("127.0.0.1", sentinel.port)], socket_timeout=2)
    with Client(settings_from_env(env)) as client, running_worker(env, tmp_path / "worker.log"):
        before = client.submit(cat, "caption", callback_url=receiver.url("/sentinel/before"))
        assert client.result(before, timeout=180).output.text == "A red picture."
        # The records and the queue live on the master the sentinel names, not on some default Redis.
        master_records = redis.Redis(port=redis_ha["master"].port)
        assert master_records.exists(f"varco:job:{before}") == 1

        killed_at = time.monotonic()
        redis_ha["master"].kill()
        wait_until(lambda: discovered_master_port(finder) == redis_ha["replica"].port, "the replica's promotion")
        promoted_at = time.monotonic()

        # The client's pooled connections pointed at the dead master: it asks the sentinel again, at once.
        after = [client.submit(cat, "caption", callback_url=receiver.url(f"/sentinel/after/{i}")) for i in range(3)]
        for status in client.wait(after, timeout=240):
            assert status.state is JobState.SUCCEEDED, status
        print(f"promoted {promoted_at - killed_at:.1f}s after the kill; 3 new jobs done "
              f"{time.monotonic() - promoted_at:.1f}s after the promotion")  # fmt: skip
        assert client.result(after[0], timeout=10).output.text == "A red picture."
        # The webhook child reconnected too: every job's terminal webhook went out.
        paths = {f"/sentinel/after/{i}" for i in range(3)}
        got = receiver.wait_for(lambda rs: paths <= {r.path for r in rs if b"job.succeeded" in r.body}, 120)
        finals = [json.loads(r.body) for r in got if r.path in paths and b"job.succeeded" in r.body]
        assert sorted(f["job_id"] for f in finals) == sorted(after)
        # Everything written after the failover is on the promoted replica.
        promoted = redis.Redis(port=redis_ha["replica"].port, decode_responses=True)
        assert promoted.execute_command("ROLE")[0] == "master"
        assert promoted.exists(*[f"varco:job:{job_id}" for job_id in after]) == 3
        # The gateway's asyncio client, built from the same sentinel URL, finds the promoted master too.
        assert asyncio.run(read_as_the_gateway_does(client.settings, after[0])).state is JobState.SUCCEEDED
