"""A worker process that dies mid-job: the supervisor restarts it, the job is delivered again after
the visibility timeout and finishes; a job that keeps killing workers ends failed as poison."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CAT, LONG, MEDIUM, wait_for_state
from helpers import VARCO_CLI

from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import LocalRedis, start_redis


def children_of(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append((int(entry.name), cmdline))
    return found


def inference_child(supervisor: subprocess.Popen, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid for pid, cmd in children_of(supervisor.pid) if "--queues" in cmd]
        if pids:
            return pids[0]
        time.sleep(0.1)
    raise AssertionError("no inference child process")


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with start_redis(tmp_path_factory.mktemp("redis-crash")) as server:
        yield server


@pytest.fixture(scope="module")
def crash_env(worker_env: dict[str, str], own_redis: LocalRedis) -> dict[str, str]:
    return {**worker_env, "VARCO_BROKER_URL": own_redis.url, "VARCO_VISIBILITY_TIMEOUT": "10",
            "VARCO_MAX_ATTEMPTS": "2"}  # fmt: skip


@pytest.fixture(scope="module")
def supervisor(crash_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    log = open(tmp_path_factory.mktemp("logs") / "crash-worker.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [*VARCO_CLI, "worker", "--gpus", "cpu", "--no-callbacks"],
        env={**os.environ, **crash_env}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    yield process
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    log.close()


@pytest.fixture(scope="module")
def crash_client(crash_env: dict[str, str], supervisor: subprocess.Popen) -> Client:
    return Client(settings_from_env(crash_env))


def test_killed_worker_is_restarted_and_the_job_is_not_lost(crash_client: Client, supervisor, http_files) -> None:
    url = http_files.add("/long-crash.png", LONG)
    job_id = crash_client.submit(url, "caption", max_new_tokens=6500)
    wait_for_state(crash_client, job_id, {"started"})
    dead_lease = crash_client.statuses.record(job_id)["lease_owner"]
    first = inference_child(supervisor)
    os.kill(first, signal.SIGKILL)  # a crash: no ack, no status update, its lease no longer renewed
    # Restarted by the supervisor; the message comes back after the visibility timeout.
    deadline = time.monotonic() + 60
    while crash_client.status(job_id).attempts < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    status = crash_client.status(job_id)
    assert status.attempts == 2, status
    assert inference_child(supervisor) != first
    # The dead run's lease lapsed before its message came back: the new run holds a lease of its own.
    assert crash_client.statuses.record(job_id).get("lease_owner") not in (None, dead_lease)
    crash_client.cancel(job_id)  # no need to wait for 6000 tokens
    assert next(crash_client.wait(job_id, timeout=60)).state.value == "cancelled"
    ok = crash_client.submit(http_files.add("/after-crash.png", CAT), "caption")
    assert next(crash_client.wait(ok, timeout=90)).state.value == "succeeded"


def test_a_job_that_keeps_killing_workers_fails_as_poison(crash_client: Client, supervisor, http_files) -> None:
    url = http_files.add("/poison.png", LONG)
    job_id = crash_client.submit(url, "caption", max_new_tokens=6500)
    for attempt in (1, 2):
        deadline = time.monotonic() + 60
        while not (
            crash_client.status(job_id).attempts == attempt and crash_client.status(job_id).state.value == "started"
        ):
            assert time.monotonic() < deadline, crash_client.status(job_id)
            time.sleep(0.1)
        os.kill(inference_child(supervisor), signal.SIGKILL)
    [status] = crash_client.wait(job_id, timeout=90)
    assert status.state.value == "failed"
    assert status.error.type == "PoisonMessageError" and status.attempts == 3


def test_sigterm_finishes_in_flight_work_then_exits(
    crash_env: dict[str, str],
    crash_client: Client,
    http_files,
    tmp_path: Path,
) -> None:
    # A second worker on a queue of its own, so the job surely runs there.
    with open(tmp_path / "worker.log", "w") as log:
        second = subprocess.Popen(
            [*VARCO_CLI, "worker", "--gpus", "cpu", "--no-callbacks", "--queues", "drain"],
            env={**os.environ, **crash_env}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    client = Client(crash_client.settings.model_copy(update={"task_routes": {"caption": "drain"}}))
    job_id = client.submit(http_files.add("/medium.png", MEDIUM), "caption", max_new_tokens=2000)
    wait_for_state(client, job_id, {"started"}, timeout=90)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 0
    status = client.status(job_id)
    assert status.state.value == "succeeded" and status.attempts == 1  # finished before the exit
    assert client.result(job_id).output.text == "b" * 1500
