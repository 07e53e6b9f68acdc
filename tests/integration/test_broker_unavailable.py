"""Redis unreachable: every Client call raises BrokerUnavailable in bounded time, the CLI says so in one
line and exits 2. Real sockets: a port nobody listens on, a redis-server that is frozen (SIGSTOP: the
kernel still accepts connections, nothing answers) and one that was shut down after the client connected."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import VARCO_CLI
from kombu.exceptions import OperationalError

from varco.producer import BrokerUnavailable, Client
from varco.tasks.celery_app import INFER_QUEUE, INFER_TASK, create_app
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import LocalRedis, free_port, start_redis

BOUND_S = 30.0  # the point: a call returns, however Redis is gone; generous for a loaded machine
CAT_URI = "https://example.com/cat.png"


def outcome_within(call: Callable[[], Any], bound_s: float = BOUND_S) -> tuple[BaseException | None, float]:
    """Run `call` on a thread; fail the test if it has not returned after `bound_s` (today's code hangs)."""
    box: dict[str, Any] = {}

    def target() -> None:
        started = time.monotonic()
        try:
            call()
            box["error"] = None
        except BaseException as exc:  # reported to the test below
            box["error"] = exc
        box["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(bound_s)
    assert not thread.is_alive(), f"the call did not return within {bound_s}s"
    return box["error"], box["elapsed"]


def calls(client: Client, job_id: str) -> dict[str, Callable[[], Any]]:
    return {
        "submit": lambda: client.submit(CAT_URI, "caption"),
        "submit_many": lambda: client.submit_many([{"image_uri": CAT_URI, "task": "caption"}] * 2),
        "status": lambda: client.status(job_id),
        "wait": lambda: list(client.wait([job_id], timeout=5)),
        "result": lambda: client.result(job_id, timeout=5),
        "cancel": lambda: client.cancel(job_id),
    }


def assert_every_call_raises_broker_unavailable(client: Client, job_id: str) -> None:
    for name, call in calls(client, job_id).items():
        error, elapsed = outcome_within(call)
        assert isinstance(error, BrokerUnavailable), f"{name} raised {error!r}"
        assert "unavailable" in str(error) and "127.0.0.1" in str(error), str(error)
        print(f"{name}: BrokerUnavailable after {elapsed:.1f}s")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(result_store=(tmp_path / "results").as_uri() + "/")


def test_a_port_nobody_listens_on(settings: Settings) -> None:
    dead = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    with Client(dead) as client:
        assert_every_call_raises_broker_unavailable(client, "0" * 32)
        with pytest.raises(BrokerUnavailable) as info:
            client.submit_many([{"image_uri": CAT_URI, "task": "caption"}] * 3)
        assert info.value.enqueued == []


@pytest.fixture
def doomed_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    server = start_redis(tmp_path)
    yield server
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def test_a_frozen_redis_fails_calls_in_bounded_time(settings: Settings, doomed_redis: LocalRedis) -> None:
    """Connections that were open go silent, new ones are accepted by the kernel and never answered:
    only socket timeouts bound the wait (redis-py and kombu wait forever by default)."""
    fast = settings.model_copy(update={"broker_url": doomed_redis.url, "redis_timeout_s": 1.0})
    with Client(fast) as client:
        job_id = client.submit(CAT_URI, "caption")  # connections now open and pooled
        os.kill(doomed_redis.process.pid, signal.SIGSTOP)
        assert_every_call_raises_broker_unavailable(client, job_id)
    # The default VARCO_REDIS_TIMEOUT_S stays inside the bound too.
    with Client(settings.model_copy(update={"broker_url": doomed_redis.url})) as client:
        error, elapsed = outcome_within(lambda: client.submit(CAT_URI, "caption"))
        assert isinstance(error, BrokerUnavailable), repr(error)
        print(f"submit with the default timeout: BrokerUnavailable after {elapsed:.1f}s")


def test_a_publish_on_a_frozen_broker_connection_gives_up(settings: Settings, doomed_redis: LocalRedis) -> None:
    """The Celery app both sides build: kombu waits forever on a silent connection unless told otherwise
    (measured before the fix: still blocked after 60 s)."""
    app = create_app(settings.model_copy(update={"broker_url": doomed_redis.url}))
    app.send_task(INFER_TASK, args=["warm", {}], queue=INFER_QUEUE)  # the producer connection is now open
    os.kill(doomed_redis.process.pid, signal.SIGSTOP)
    error, elapsed = outcome_within(lambda: app.send_task(INFER_TASK, args=["frozen", {}], queue=INFER_QUEUE))
    assert isinstance(error, OperationalError), repr(error)
    print(f"publish on a frozen broker: {type(error).__name__} after {elapsed:.1f}s")


def test_a_wait_past_its_timeout_is_a_timeout_not_an_outage(settings: Settings, doomed_redis: LocalRedis) -> None:
    with Client(settings.model_copy(update={"broker_url": doomed_redis.url})) as client:
        job_id = client.submit(CAT_URI, "caption")  # no worker: it stays queued
        with pytest.raises(TimeoutError) as info:
            list(client.wait([job_id], timeout=0.5))
        assert not isinstance(info.value, BrokerUnavailable)


def test_a_redis_shut_down_under_a_connected_client(settings: Settings, doomed_redis: LocalRedis) -> None:
    with Client(settings.model_copy(update={"broker_url": doomed_redis.url})) as client:
        job_id = client.submit(CAT_URI, "caption")
        doomed_redis.stop()
        assert_every_call_raises_broker_unavailable(client, job_id)


def test_the_cli_prints_one_line_and_exits_2(settings: Settings) -> None:
    env = {
        **os.environ,
        "VARCO_BROKER_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0",
        "VARCO_RESULT_STORE": settings.result_store,
    }
    for argv in (
        ["submit", CAT_URI, "--task", "caption"],
        ["status", "0" * 32],
        ["wait", "0" * 32],
        ["cancel", "0" * 32],
    ):
        run = subprocess.run([*VARCO_CLI, *argv], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, (argv, run.stdout, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert "Traceback" not in run.stderr, run.stderr
        # `wait` may leave its (empty) progress bar above the message.
        assert len(lines) == 1 or (argv[0] == "wait" and len(lines) == 2 and "0/1" in lines[0]), run.stderr
        assert lines[-1].startswith(f"varco {argv[0]}: error: Redis at redis://:**@127.0.0.1:"), lines[-1]
        assert "unavailable" in lines[-1] and "s3cret" not in lines[-1]
