"""A Redis restart loses nothing when Redis runs as we ship it (infra/compose.yaml's flags: AOF, fsync
every second): queued jobs and status records come back, the client reconnects, the jobs run. Without
persistence the same restart loses them, which is what docs/redis.md and the node's start-up warning say."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import running_worker

from varco.producer import Client, JobNotFound
from varco.tasks.schemas import JobState
from varco.tasks.settings import settings_from_env
from varco.tasks.status import EVENTS_CHANNEL
from varco.workers.devtools.local_redis import LocalRedis, free_port, start_redis

COMPOSE = Path(__file__).resolve().parents[2] / "infra" / "compose.yaml"


def shipped_redis_flags() -> list[str]:
    """The redis-server options of the compose file (its command after the binary's name)."""
    command = yaml.safe_load(COMPOSE.read_text())["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    return command[1:]


class Waiter(threading.Thread):
    """Runs `call` on a thread; `outcome()` returns what it returned or raises what it raised."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.call, self.value, self.error = call, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.call()
        except BaseException as exc:  # handed to the test by outcome()
            self.error = exc

    def outcome(self, timeout: float) -> Any:
        self.join(timeout)
        assert not self.is_alive(), f"still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.value


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.05)


def restarted(server: LocalRedis, workdir: Path, flags: list[str], down_s: float = 0.0) -> LocalRedis:
    server.stop()  # SIGTERM: what compose and Kubernetes send
    time.sleep(down_s)  # down for longer than redis-py's own reconnect retry covers
    return start_redis(workdir, port=server.port, extra_args=flags)


def test_queued_jobs_and_records_survive_a_restart_of_redis_as_shipped(
    worker_env: dict[str, str], file_root: Path, tmp_path: Path
) -> None:
    flags = shipped_redis_flags()
    server = start_redis(tmp_path, extra_args=flags)
    env = {**worker_env, "VARCO_BROKER_URL": server.url, "VARCO_METRICS_PORT": str(free_port())}
    cat = (file_root / "cat.png").as_uri()
    try:
        with Client(settings_from_env(env)) as client:
            queued = [client.submit(cat, "caption") for _ in range(4)]  # no worker yet: they wait in the queue
            # A wait under way when Redis restarts rides the restart out.
            waiter = Waiter(lambda: list(client.wait(queued, timeout=240)))
            wait_until(lambda: client.redis.pubsub_numsub(EVENTS_CHANNEL)[0][1] >= 1, "the waiter subscribing")
            server = restarted(server, tmp_path, flags, down_s=3.0)
            assert client.redis.config_get("appendonly") == {"appendonly": "yes"}
            # Same client, new server process: it reconnects, and the records are still there.
            assert {client.status(job_id).state for job_id in queued} == {JobState.QUEUED}
            with running_worker(env, tmp_path / "worker.log"):
                finished = waiter.outcome(260)
            assert sorted(s.job_id for s in finished) == sorted(queued)
            assert all(s.state is JobState.SUCCEEDED for s in finished), finished
    finally:
        server.stop()


def test_without_persistence_a_restart_loses_queued_jobs(settings_for_loss: dict, tmp_path: Path) -> None:
    """The loss docs/redis.md warns about, measured on a real redis-server."""
    server = start_redis(tmp_path)  # --save "" --appendonly no
    try:
        with Client(settings_from_env({**settings_for_loss, "VARCO_BROKER_URL": server.url})) as client:
            job_id = client.submit("https://example.com/cat.png", "caption")
            server = restarted(server, tmp_path, ["--save", "", "--appendonly", "no"])
            with pytest.raises(JobNotFound):
                client.status(job_id)
            assert client.redis.dbsize() == 0
    finally:
        server.stop()


@pytest.fixture
def settings_for_loss(tmp_path: Path) -> dict[str, str]:
    return {"VARCO_RESULT_STORE": (tmp_path / "results").as_uri() + "/"}
