"""How long a `varco worker --gpus cpu` node takes to stop on SIGTERM, once it has served a job.

Every integration test fixture that starts a node pays this when it stops it, so it matters for the
suite's wall time. Each run: a fresh node on the tiny offline model (scripted answers) against a private
redis-server and a file result store, wait until /readyz answers 200, run one caption job to the end, then
SIGTERM the supervisor and time until it has exited (both children stopped: the inference child and the
webhook process). The inference child's own log lines give the split: SIGTERM to "warm shutdown" done.

Run: .venv/bin/python bench/worker_stop.py [--runs 3] [--engine hf|vllm]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from plain_png import plain_png

from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.devtools.local_worker import local_worker
from varco.workers.devtools.scripted import SCRIPTED_PLUGIN, SCRIPTS_FILE
from varco.workers.devtools.tiny_model import make_tiny_model


def wait_ready(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 300.0) -> float:
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"node exited: {log.read_text()}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"node never ready: {log.read_text()}")


def one_run(env: dict[str, str], root: Path, index: int, image: str) -> tuple[float, float]:
    port = free_port()
    env = {**env, "VARCO_METRICS_PORT": str(port)}
    log = root / f"node-{index}.log"
    # local_worker's own stop is what tests pay; time it by hand here instead.
    with local_worker(env, log) as process:
        start_s = wait_ready(port, process, log)
        with Client(settings_from_env(env)) as client:
            job = client.submit(image, "caption")
            (status,) = list(client.wait([job], timeout=120))
            assert status.state.value == "succeeded", status
        t0 = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        stop_s = time.perf_counter() - t0
    return start_s, stop_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "redis").mkdir()
        model = make_tiny_model(root / "tiny-varco")
        png = plain_png((64, 64))
        (root / "images").mkdir()
        (root / "images" / "a.png").write_bytes(png)
        scripts = {f"{hashlib.sha256(png).hexdigest()}:caption": "A picture."}
        (model / SCRIPTS_FILE).write_text(json.dumps(scripts), encoding="utf-8")
        with start_redis(root / "redis") as redis_server:
            env = {
                "VARCO_BROKER_URL": redis_server.url,
                "VARCO_RESULT_STORE": f"file://{root}/results/",
                "VARCO_MODEL": str(model),
                "VARCO_ENGINE": args.engine,
                "VARCO_ENGINE_PLUGINS": SCRIPTED_PLUGIN,
                "VARCO_FILE_ROOT": str(root / "images"),
                "VARCO_MAX_NEW_TOKENS": "16",
            }
            if args.engine == "vllm":
                env["VLLM_CACHE_ROOT"] = str(root / "vllm-cache")
            starts, stops = [], []
            for index in range(args.runs):
                start_s, stop_s = one_run(env, root, index, f"file://{root}/images/a.png")
                starts.append(start_s)
                stops.append(stop_s)
                print(f"run {index + 1}: ready after {start_s:.2f}s, stopped {stop_s:.2f}s after SIGTERM", flush=True)
    print(
        f"engine {args.engine}, {args.runs} runs: stop median {statistics.median(stops):.2f}s "
        f"(min {min(stops):.2f}, max {max(stops):.2f}); load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
