"""How long `varco gateway` takes to stop with event streams open, and whether their bodies end whole.

Run: .venv/bin/python bench/stream_shutdown.py [--streams 20] [--runs 3]
A private redis-server and a gateway process (no worker, so the jobs stay queued and every stream stays
open). Each run opens `--streams` `GET /v1/jobs/{id}/events` streams, each on its own job and
connection, waits until every one has its first status, sends the gateway SIGTERM, and reports the time
from the signal to the process's exit and how many bodies arrived whole (a complete chunked transfer)
rather than truncated (httpx's "incomplete chunked read", curl's exit 18), with each one's last event.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.devtools.local_worker import VARCO_CLI

KEY = "bench-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
JOB = {"image_uri": "https://images.example/cat.png", "task": "caption"}


def read_stream(url: str, opened: threading.Semaphore, outcome: list[str]) -> None:
    body = b""
    try:
        with httpx.stream("GET", url, headers=AUTH, timeout=120) as response:
            for chunk in response.iter_raw():
                if b"event: status" in chunk and b"event: status" not in body:
                    opened.release()
                body += chunk
        frames = [f for f in body.decode().split("\n\n") if f.strip()]
        last = frames[-1].splitlines()[0] if frames else "(empty)"
        outcome.append(f"whole, last {last!r}")
    except httpx.HTTPError as exc:
        outcome.append(f"truncated ({type(exc).__name__})")


def one_run(workdir: Path, streams: int) -> tuple[float, Counter[str]]:
    with start_redis(workdir) as redis_server:
        env = {**os.environ, "VARCO_BROKER_URL": redis_server.url, "VARCO_API_KEYS": KEY,
               "VARCO_RESULT_STORE": (workdir / "results").as_uri() + "/"}  # fmt: skip
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with open(workdir / "gateway.log", "w") as log:
            gateway = subprocess.Popen([*VARCO_CLI, "gateway", "--host", "127.0.0.1", "--port", str(port)],
                                       env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(base + "/livez", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and gateway.poll() is None, "the gateway did not start"
                time.sleep(0.1)
            jobs = [httpx.post(base + "/v1/jobs", json=JOB, headers=AUTH).json()["job_id"] for _ in range(streams)]
            opened, outcome = threading.Semaphore(0), []
            readers = [threading.Thread(target=read_stream, args=(f"{base}/v1/jobs/{j}/events", opened, outcome))
                       for j in jobs]  # fmt: skip
            for reader in readers:
                reader.start()
            for _ in jobs:
                assert opened.acquire(timeout=60), "a stream never opened"
            started = time.monotonic()
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=120)
            exit_s = time.monotonic() - started
            for reader in readers:
                reader.join(timeout=120)
            return exit_s, Counter(outcome)
        finally:
            if gateway.poll() is None:
                gateway.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    times = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            exit_s, outcome = one_run(Path(tmp), args.streams)
        times.append(exit_s)
        print(f"run {run + 1}: SIGTERM to exit {exit_s:.2f} s; bodies: {dict(outcome)}", flush=True)
    print(f"median SIGTERM to exit over {args.runs} runs with {args.streams} open streams: "
          f"{statistics.median(times):.2f} s", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
