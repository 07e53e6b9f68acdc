"""Submit latency and jobs/s: HTTP gateway (`POST /v1/jobs`) against direct `Client.submit`, in one run.

Run: .venv/bin/python bench/gateway_submit.py [--jobs 1000] [--threads 16]
Starts a private redis-server and `varco gateway` (uvicorn, one process) on free ports; no worker runs,
so this measures enqueueing only: validation, the status record, the Celery message. Each side submits
the same jobs one at a time (latency p50/p95), then from --threads threads at once (jobs/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import free_port, start_redis

KEY = "bench-key-0123456789abcdef"
JOB = {"image_uri": "https://images.example.com/cat.jpg", "task": "grounding", "metadata": {"photo": 81}}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def one_by_one(submit: Callable[[], str], jobs: int) -> list[float]:
    latencies = []
    for _ in range(jobs):
        start = time.perf_counter()
        submit()
        latencies.append(time.perf_counter() - start)
    return latencies


def concurrent(submit: Callable[[], str], jobs: int, threads: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: submit(), range(jobs)))
    return jobs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        redis = start_redis(Path(tmp))
        env = {"VARCO_BROKER_URL": redis.url, "VARCO_RESULT_STORE": Path(tmp).as_uri() + "/", "VARCO_API_KEYS": KEY}
        port = free_port()
        gateway = subprocess.Popen(
            [sys.executable, "-m", "varco.producer.cli", "gateway", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(base + "/livez").status_code == 200:
                        break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            client = Client(settings_from_env(env))
            http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"},
                                limits=httpx.Limits(max_connections=args.threads))  # fmt: skip

            def direct() -> str:
                return client.submit(**JOB)

            def over_http() -> str:
                response = http.post("/v1/jobs", json=JOB)
                response.raise_for_status()
                return response.json()["job_id"]

            for submit in (direct, over_http):  # warm-up: connections, imports, Lua scripts loaded
                one_by_one(submit, 50)
            rows = []
            for name, submit in (("Client.submit", direct), ("gateway POST /v1/jobs", over_http)):
                latencies = one_by_one(submit, args.jobs)
                rate = concurrent(submit, args.jobs, args.threads)
                serial = len(latencies) / sum(latencies)
                rows.append((name, percentile(latencies, 50), percentile(latencies, 95), serial, rate))
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
            redis.stop()

    print(f"{args.jobs} grounding jobs per row (https image URI, metadata), enqueue only; gateway: one uvicorn process")
    print(f"| path | p50 ms | p95 ms | jobs/s one at a time | jobs/s from {args.threads} threads |")
    print("| --- | --- | --- | --- | --- |")
    for name, p50, p95, serial, parallel in rows:
        print(f"| {name} | {p50 * 1000:.2f} | {p95 * 1000:.2f} | {serial:.0f} | {parallel:.0f} |")


if __name__ == "__main__":
    main()
