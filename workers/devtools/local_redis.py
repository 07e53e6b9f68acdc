"""Start private, throw-away redis-servers on free loopback ports (demo and tests): a plain one, or a
master, replica and sentinel set to test failover."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from varco.tasks.connections import redis_from_url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        return bool(redis_from_url(url, timeout_s=timeout_s, retries=0).ping())
    except (redis.RedisError, OSError):
        return False


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; returns once it has exited."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


@dataclass
class LocalRedis:
    process: subprocess.Popen
    port: int
    master_name: str | None = None  # set for a sentinel

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def sentinel_url(self) -> str:
        """The broker URL that reaches the master through this sentinel."""
        return f"sentinel://127.0.0.1:{self.port}/0"

    def __enter__(self) -> LocalRedis:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        stop_process(self.process, 10)

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown save."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    return binary


def _started(argv: list[str], port: int, timeout_s: float, master_name: str | None = None) -> LocalRedis:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = LocalRedis(process, port, master_name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answers(server.url, 0.2):
            return server
        if process.poll() is not None:
            break
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"redis-server did not start on port {port}")


def start_redis(
    workdir: Path | None = None,
    timeout_s: float = 10.0,
    *,
    persistent: bool = False,
    extra_args: Sequence[str] = (),
    port: int | None = None,
) -> LocalRedis:
    """A redis-server on a free port. `persistent`: AOF as in production (appendonly yes, everysec), else
    nothing is saved. `extra_args` go last, e.g. ["--replicaof", "127.0.0.1", "6379"]. `port`: restart one
    on the port it had."""
    port = port or free_port()
    argv = [_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "yes", "--appendfsync", "everysec"] if persistent else ["--appendonly", "no"]
    if workdir is not None:
        argv += ["--dir", str(workdir)]
    return _started([*argv, *extra_args], port, timeout_s)


def start_replica(master: LocalRedis, workdir: Path | None = None, timeout_s: float = 10.0) -> LocalRedis:
    return start_redis(workdir, timeout_s, extra_args=["--replicaof", "127.0.0.1", str(master.port)])


def start_sentinel(
    master: LocalRedis,
    workdir: Path,
    master_name: str = "mymaster",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 5000,
    timeout_s: float = 10.0,
) -> LocalRedis:
    """`redis-server --sentinel` watching `master` (quorum 1), quick to fail over: tests kill the master."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"sentinel-{port}.conf"  # a sentinel rewrites its config file: one each
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor {master_name} 127.0.0.1 {master.port} 1\n"
        f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
        f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
        f"sentinel parallel-syncs {master_name} 1\n"
    )
    return _started([_binary(), str(config), "--sentinel"], port, timeout_s, master_name)
