"""A worker node says at start whether its broker survives a restart: a warning when Redis persists
nothing, a softer line when Redis will not say (CONFIG refused, as on managed Redis)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from varco.workers.devtools.local_redis import LocalRedis, free_port, start_redis
from varco.workers.devtools.local_worker import local_worker

NOTHING = "persists nothing"
CANNOT_TELL = "cannot tell whether the broker"
PERSISTS = "persists its data (appendonly yes, appendfsync everysec)"


def node_start_log(worker_env: dict[str, str], server: LocalRedis, log_path: Path, expected: str) -> str:
    """Start `varco worker`, read its log until `expected` shows up (or 120 s pass), stop it."""
    env = {**os.environ, **worker_env, "VARCO_BROKER_URL": server.url, "VARCO_METRICS_PORT": str(free_port())}
    with local_worker(env, log_path, "--no-callbacks") as process:
        deadline = time.monotonic() + 120
        while expected not in log_path.read_text() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
    return log_path.read_text()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, LocalRedis]]:
    for name in ("none", "aof", "managed"):
        (tmp_path / name).mkdir()
    started = {
        "none": start_redis(tmp_path / "none"),
        "aof": start_redis(tmp_path / "aof", persistent=True),
        "managed": start_redis(tmp_path / "managed", extra_args=["--rename-command", "CONFIG", ""]),
    }
    yield started
    for server in started.values():
        server.stop()


def test_a_node_warns_when_its_broker_persists_nothing(
    worker_env: dict[str, str], servers: dict[str, LocalRedis], tmp_path: Path
) -> None:
    log = node_start_log(worker_env, servers["none"], tmp_path / "none.log", NOTHING)
    line = next((line for line in log.splitlines() if NOTHING in line), f"no line says {NOTHING!r}:\n{log}")
    assert "WARNING" in line and "loses every queued job" in line and "appendonly yes" in line, line

    log = node_start_log(worker_env, servers["aof"], tmp_path / "aof.log", PERSISTS)
    assert PERSISTS in log and NOTHING not in log and CANNOT_TELL not in log

    log = node_start_log(worker_env, servers["managed"], tmp_path / "managed.log", CANNOT_TELL)
    line = next((line for line in log.splitlines() if CANNOT_TELL in line), f"no line says {CANNOT_TELL!r}")
    assert "WARNING" not in line and "CONFIG GET refused" in line, line
