"""Start private, throw-away RabbitMQ nodes on free loopback ports (tests), as local_redis starts redis-server.

Each node has its own name, AMQP and distribution ports, data and log directories, config files and Erlang
cookie (a `.erlang.cookie` in its own HOME), so it never meets a RabbitMQ the machine already runs. It shares
the machine's epmd, which only maps node names to ports. `consumer_timeout_ms` and `channel_tick_ms` let a
test meet the delivery-acknowledgement timeout in seconds: RabbitMQ 3.10 checks it on each channel's tick
(60 s by default), so lowering the timeout alone would let a test pass by luck.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import amqp

from varco.workers.devtools.local_redis import free_port, stop_process

# The scripts themselves: Debian's /usr/sbin wrappers switch to the rabbitmq user, who cannot write our
# temporary directories, and use that user's HOME (and cookie).
SCRIPTS = Path("/usr/lib/rabbitmq/bin")


def _script(name: str) -> str:
    found = SCRIPTS / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        raise RuntimeError(f"{name} is not installed (Debian: apt-get install rabbitmq-server)")
    return on_path


@dataclass
class LocalRabbitMQ:
    process: subprocess.Popen
    port: int
    nodename: str
    env: dict[str, str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl(self, *args: str, timeout_s: float = 60.0) -> str:
        """`rabbitmqctl -n NODE ARGS…` against this node (its own cookie); stdout."""
        argv = [_script("rabbitmqctl"), "-n", self.nodename, "-q", *args]
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout_s, check=True)
        return done.stdout

    def queue_types(self) -> dict[str, str]:
        """Each queue's type (quorum, classic) by name."""
        rows = self.ctl("list_queues", "name", "type", "--no-table-headers").splitlines()
        return {name: kind for name, kind in (row.split("\t") for row in rows if "\t" in row)}

    def __enter__(self) -> LocalRabbitMQ:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        stop_process(self.process, 30)

    def kill(self) -> None:
        """SIGKILL of the whole node (the script and its Erlang VM): a crash."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
        self.process.wait()


def answers(port: int, timeout_s: float = 1.0) -> bool:
    try:
        connection = amqp.Connection(f"127.0.0.1:{port}", connect_timeout=timeout_s)
        connection.connect()
        connection.close()
        return True
    except (OSError, amqp.exceptions.AMQPError):
        return False


def start_rabbitmq(
    workdir: Path,
    *,
    consumer_timeout_ms: int | None = None,
    channel_tick_ms: int | None = None,
    cookie: str | None = None,
    timeout_s: float = 60.0,
) -> LocalRabbitMQ:
    """One RabbitMQ node on a free loopback port, its state under `workdir` (guest/guest, vhost /). Nodes
    of one cluster share a `cookie`."""
    port, dist_port = free_port(), free_port()
    nodename = f"varco-{port}@localhost"
    home = workdir / f"node-{port}"
    for sub in ("log", "mnesia"):
        (home / sub).mkdir(parents=True)
    cookie_file = home / ".erlang.cookie"
    cookie_file.write_text(cookie or secrets.token_hex(16))
    cookie_file.chmod(0o400)
    config = home / "rabbitmq.conf"
    lines = [f"listeners.tcp.default = 127.0.0.1:{port}", "loopback_users = none"]
    if consumer_timeout_ms is not None:
        lines.append(f"consumer_timeout = {consumer_timeout_ms}")
    config.write_text("\n".join(lines) + "\n")
    advanced = home / "advanced.config"
    tick = f"{{channel_tick_interval, {channel_tick_ms}}}" if channel_tick_ms else ""
    advanced.write_text(f"[{{rabbit, [{tick}]}}].\n")
    plugins = home / "enabled_plugins"
    plugins.write_text("[].\n")
    env = {
        **os.environ,
        "HOME": str(home),
        "RABBITMQ_NODENAME": nodename,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
        "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_CONFIG_FILE": str(config),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(advanced),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
        "RABBITMQ_PID_FILE": str(home / "node.pid"),
        "ERL_CRASH_DUMP": str(home / "erl_crash.dump"),
    }
    # Its own session: kill() takes the Erlang VM down with the script that started it.
    with (home / "log" / "console.log").open("wb") as output:
        process = subprocess.Popen([_script("rabbitmq-server")], env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    node = LocalRabbitMQ(process, port, nodename, env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answers(port, 0.5):
            return node
        if process.poll() is not None:
            break
        time.sleep(0.2)
    node.kill()
    raise RuntimeError(f"rabbitmq-server did not start on port {port} (logs: {home / 'log'})")


def start_cluster(workdir: Path, size: int = 3, **options: Any) -> list[LocalRabbitMQ]:
    """`size` nodes joined into one cluster (the first one's); quorum queues declared afterwards get a
    member on each. `options` as for start_rabbitmq."""
    cookie = secrets.token_hex(16)
    nodes: list[LocalRabbitMQ] = []
    try:
        with ThreadPoolExecutor(size) as pool:  # they boot in parallel; a failed one raises below
            started = [pool.submit(start_rabbitmq, workdir, cookie=cookie, **options) for _ in range(size)]
            for future in started:
                with contextlib.suppress(Exception):
                    nodes.append(future.result())
        if len(nodes) < size:
            raise RuntimeError(f"only {len(nodes)} of {size} RabbitMQ nodes started (logs under {workdir})")
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", nodes[0].nodename)
            node.ctl("start_app")
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes
