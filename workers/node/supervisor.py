"""`varco worker --gpus 0,1 | all | cpu`: one child process per GPU, plus one for webhooks.

Each child is a fresh interpreter started with CUDA_VISIBLE_DEVICES set, so torch in it sees one
GPU and the parent never touches CUDA. Each child leads its own process group: when it dies, what
it started (vLLM's engine-core processes) is killed with it, then it is restarted (with growing
backoff if it keeps dying). SIGTERM/SIGINT are passed on as SIGTERM (Celery's warm shutdown:
in-flight jobs finish, the engine shuts down) and the supervisor exits when the children have.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from varco.tasks.celery_app import CALLBACK_BATCH_QUEUE, CALLBACK_QUEUE, create_app, depth_reader
from varco.tasks.connections import describe, redis_client
from varco.tasks.settings import Settings
from varco.workers.logs import configure_logging
from varco.workers.node import exit_codes, node_http
from varco.workers.node.broker_persistence import log_broker_persistence
from varco.workers.node.health import NODE_STATE_ENV, PROBE_TIMEOUT_S, NodeHealth

log = logging.getLogger("varco.supervisor")


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    load_failures: int = 0  # in a row
    started_at: float = 0.0

    def start(self) -> None:
        # Its own process group: whatever it starts (vLLM's engine-core processes) can be ended with it.
        self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def forget_metrics(self) -> None:
        """Drop a dead child's live gauges (prometheus-client multiprocess mode); its counters stay."""
        directory = self.env.get("PROMETHEUS_MULTIPROC_DIR")
        if directory and self.process is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(self.process.pid, directory)

    def kill_group(self) -> None:
        """End what is left of the child's process group once the child itself has exited."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left
            os.killpg(self.process.pid, signal.SIGKILL)


def gpu_ids(spec: str) -> list[str] | None:
    """ "0,1" -> ["0", "1"]; "all" -> every visible GPU; "cpu" -> None (CPU mode)."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return None
    if spec == "all":
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        count = int(out.stdout.strip() or 0)
        if count == 0:
            raise SystemExit("--gpus all: no CUDA device is visible; use --gpus cpu")
        return [str(i) for i in range(count)]
    ids = [part.strip() for part in spec.split(",") if part.strip()]
    if not ids or not all(i.isdigit() for i in ids):
        raise SystemExit(f"--gpus takes 0,1,… | all | cpu, not {spec!r}")
    return ids


def plan_children(
    gpus: str, queues: str, callbacks: bool, concurrency: int | None, state_dir: Path | None = None
) -> list[Child]:
    # Celery node names must differ between nodes on one host (control replies, events, status records'
    # `worker`): the host part carries this supervisor's pid, the gpuN/cpuN prefix stays as it was.
    host = f"{socket.gethostname()}-{os.getpid()}"
    # Children write their metrics and heartbeats into the node's state directory.
    shared = {"PROMETHEUS_MULTIPROC_DIR": str(state_dir), NODE_STATE_ENV: str(state_dir)} if state_dir else {}
    ids = gpu_ids(gpus)
    base = [sys.executable, "-m", "varco.workers.runtime.main", "--queues", queues]
    if concurrency:
        base += ["--concurrency", str(concurrency)]
    children = []
    for index, gpu in enumerate(ids or [None]):
        name = f"gpu{gpu}@{host}" if gpu is not None else f"cpu{index}@{host}"
        env = {**os.environ, **shared, "CUDA_VISIBLE_DEVICES": gpu if gpu is not None else ""}
        children.append(Child(name, [*base, "--hostname", name], env))
    if callbacks:
        name = f"callbacks@{host}"
        argv = [sys.executable, "-m", "varco.workers.runtime.main", "--callbacks", "--hostname", name]
        children.append(Child(name, argv, {**os.environ, **shared, "CUDA_VISIBLE_DEVICES": ""}))
    return children


def supervise(children: list[Child], grace_s: float = 120.0) -> int:
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("received signal %d: stopping children (in-flight jobs finish first)", signum)
        stopping = True
        for child in children:
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for child in children:
        child.start()
    failure: str | None = None
    while not stopping:
        time.sleep(0.5)
        for child in children:
            code = child.process.poll() if child.process else 0
            if code is None or stopping:
                continue
            child.kill_group()
            child.forget_metrics()
            failure = _gives_up(child, code)
            if failure is not None:
                log.error("%s", failure)
                on_signal(signal.SIGTERM, None)  # stop the others too: this node cannot serve as configured
                break
            # A child that lived a while restarts at once; one that keeps dying backs off up to 30 s.
            child.restarts = 0 if time.monotonic() - child.started_at > 60 else child.restarts + 1
            delay = min(30.0, 2.0 ** max(0, child.restarts - 1)) if child.restarts else 0.0
            log.warning("%s exited with %s; restarting in %.0fs", child.name, code, delay)
            time.sleep(delay)
            if not stopping:
                child.start()
    deadline = time.monotonic() + grace_s
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", child.name, grace_s)
            child.process.kill()
            child.process.wait()
        child.kill_group()
    return 1 if failure is not None else 0


def _gives_up(child: Child, code: int) -> str | None:
    """Why the supervisor stops instead of restarting this child, or None to restart it."""
    if code == exit_codes.CANNOT_START:
        return f"{child.name} cannot start as configured (its log above says why); giving up"
    if code == exit_codes.LOAD_FAILED:
        child.load_failures += 1
        if child.load_failures >= exit_codes.MAX_LOAD_FAILURES:
            return f"{child.name} failed to load its model {child.load_failures} times in a row; giving up"
    else:
        child.load_failures = 0
    return None


def run(gpus: str, queues: str, callbacks: bool = True, concurrency: int | None = None) -> int:
    """Run the node's children until SIGTERM (exit 0) or until one cannot start (exit 1)."""
    configure_logging(f"supervisor@{socket.gethostname()}")
    try:
        settings = Settings()
    except ValidationError as exc:
        log.error("this node cannot start: %s; giving up", exc)
        return 1
    with redis_client(settings, timeout_s=PROBE_TIMEOUT_S, retries=0) as probe:
        log_broker_persistence(probe, describe(settings.status_redis_url))  # the Redis of status records
    state_dir = Path(tempfile.mkdtemp(prefix="varco-node-"))
    try:
        children = plan_children(gpus, queues, callbacks, concurrency, state_dir)
        server = _serve_endpoint(settings, children, state_dir, queues.split(","), callbacks)
        try:
            return supervise(children)
        finally:
            if server is not None:
                server.shutdown()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def node_pids(children: list[Child]) -> dict[str, int]:
    """The node's living processes by name, for their process_* metrics (read from the HTTP thread)."""
    pids = {"supervisor": os.getpid()}
    for child in children:
        if child.process is not None and child.process.returncode is None:
            pids[child.name] = child.process.pid
    return pids


def _serve_endpoint(
    settings: Settings, children: list[Child], state_dir: Path, queues: list[str], callbacks: bool
) -> node_http.ThreadingHTTPServer | None:
    if settings.metrics_port == 0:
        return None
    inference = [c.name for c in children if not c.name.startswith("callbacks@")]
    health = NodeHealth(state_dir, lambda: inference, settings)
    watched = [*queues, CALLBACK_QUEUE, CALLBACK_BATCH_QUEUE] if callbacks else queues
    try:
        client = redis_client(settings, timeout_s=PROBE_TIMEOUT_S, retries=0)
        return node_http.serve(settings.metrics_port, state_dir, health, client, watched, settings.tenant_weights,
                               host=settings.metrics_host, pids=lambda: node_pids(children),
                               depth=depth_reader(create_app(settings), client))  # fmt: skip
    except OSError as exc:  # serving jobs matters more than being scraped
        log.error("cannot serve /metrics, /livez, /readyz on %s:%d (%s); running without them",
                  settings.metrics_host, settings.metrics_port, exc)  # fmt: skip
        return None
