"""Celery's own tools against a live `varco worker`: inspect, control revoke, and Flower's task list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import wait_for_state
from helpers import WebhookReceiver

from varco.producer import Client
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import free_port

CELERY = [sys.executable, "-m", "celery", "-A", "varco.tasks.celery_app"]


def celery(worker_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CELERY, *args], env={**os.environ, **worker_env}, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def serving(client: Client, http_files) -> Client:
    """The session worker, once it has loaded its model and served a job."""
    job = client.submit(http_files.base + "/cat.png", "caption")
    assert next(client.wait(job, timeout=120)).state.value == "succeeded"
    return client


def test_inspect_sees_the_worker_its_queues_and_stats(worker_env: dict[str, str], serving: Client) -> None:
    ping = celery(worker_env, "inspect", "ping", "--json")
    assert ping.returncode == 0, ping.stderr
    replies = json.loads(ping.stdout)
    assert any(name.startswith("cpu0@") and reply == {"ok": "pong"} for name, reply in replies.items())
    queues = json.loads(celery(worker_env, "inspect", "active_queues", "--json").stdout)
    assert any("varco" in {q["name"] for q in qs} for qs in queues.values())
    stats = json.loads(celery(worker_env, "inspect", "stats", "--json").stdout)
    assert any("thread" in s["pool"]["implementation"] for s in stats.values()), stats
    assert celery(worker_env, "inspect", "active", "--json").returncode == 0


def test_a_celery_revoke_of_a_queued_job_ends_it_cancelled(
    worker_env: dict[str, str], settings: Settings, serving: Client, receiver: WebhookReceiver
) -> None:
    # The job waits on a queue the worker does not read yet, so the revoke lands before delivery.
    parked = Client(settings.model_copy(update={"task_routes": {"caption": "varco.revoke-test"}}))
    hook = "/revoked"
    try:
        job_id = parked.submit("https://example.com/never-fetched.png", "caption", callback_url=receiver.url(hook))
        assert celery(worker_env, "control", "revoke", job_id).returncode == 0
        # Only inference workers may consume it: a broadcast would also reach the webhook worker, which
        # has no varco.infer task and would drop the message as unregistered.
        ping = json.loads(celery(worker_env, "inspect", "ping", "--json").stdout)
        inference = ",".join(name for name in ping if not name.startswith("callbacks@"))
        added = celery(worker_env, "control", "add_consumer", "varco.revoke-test", "-d", inference)
        assert added.returncode == 0, added.stderr
        wait_for_state(parked, job_id, {"cancelled"}, timeout=60)
        assert parked.status(job_id).attempts == 0  # never run
        # A webhook-driven backend hears of it too: job.cancelled, the job's one terminal event.
        got = receiver.wait_for(lambda rs: any(r.path == hook for r in rs), timeout=60)
        assert [json.loads(r.body)["type"] for r in got if r.path == hook] == ["job.cancelled"]
    finally:
        celery(worker_env, "control", "cancel_consumer", "varco.revoke-test")
        parked.close()


@pytest.fixture
def flower(worker_env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, **worker_env, "FLOWER_UNAUTHENTICATED_API": "true"}
    process = subprocess.Popen(
        [*CELERY, "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("flower did not start")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def flower_tasks(base: str) -> dict:
    return httpx.get(f"{base}/api/tasks", timeout=5).json()


def test_flower_lists_the_finished_jobs(flower: str, serving: Client, http_files) -> None:
    client = serving
    # Flower subscribes to the event channel a moment after it answers HTTP: a probe job it has seen
    # proves it is listening, so the jobs after it must all show up.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe = client.submit(http_files.base + "/cat.png", "caption")
        next(client.wait(probe, timeout=60))
        if probe in flower_tasks(flower):
            break
    else:
        raise AssertionError("Flower never saw a job")
    ids = [client.submit(http_files.base + "/cat.png", "caption") for _ in range(3)]
    assert {s.state.value for s in client.wait(ids, timeout=120)} == {"succeeded"}
    deadline = time.monotonic() + 30
    seen: dict = {}
    while time.monotonic() < deadline:
        seen = flower_tasks(flower)
        if all(seen.get(i, {}).get("state") == "SUCCESS" for i in ids):
            break
        time.sleep(0.2)
    assert {i: seen.get(i, {}).get("state") for i in ids} == dict.fromkeys(ids, "SUCCESS")
    assert all(seen[i]["name"] == "varco.infer" and seen[i]["worker"].startswith("cpu0@") for i in ids)
