"""Batch API throughput (lines/s) against `POST /v1/jobs/batch` for the same jobs, in one run.

Run: .venv/bin/python bench/batch_throughput.py [--lines 5000] [--batch 16]
Starts a private redis-server, one `varco worker --gpus cpu` node (the tiny offline model; its callback process
runs the batch runner) and `varco gateway`, all on loopback. The same caption job (a 64x64 PNG as a data: URI,
max_tokens 1) is run --lines times two ways, one after the other:
- jobs: `POST /v1/jobs/batch` 100 at a time, then waiting for every job to finish (`Client.wait`);
- batch: `POST /v1/files` (one JSONL file) and `POST /v1/batches`, then polling `GET /v1/batches/{id}` until
  `completed` (its output file written).
Each figure runs from the first request to the last job finished (batch: to the batch completed).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from plain_png import plain_png

from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.devtools.tiny_model import make_tiny_model

KEY = "bench-key-0123456789abcdef"


def wait_ready(base: str) -> None:
    for _ in range(600):
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("gateway did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    image = "data:image/png;base64," + base64.b64encode(plain_png((64, 64))).decode()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis = start_redis(root)
        port = free_port()
        env = {
            "VARCO_BROKER_URL": redis.url, "VARCO_MODEL": str(make_tiny_model(root / "model")),
            "VARCO_RESULT_STORE": (root / "results").as_uri() + "/", "VARCO_MAX_BATCH_SIZE": str(args.batch),
            "VARCO_API_KEYS": KEY, "VARCO_GATEWAY_MAX_BATCH": "100", "VARCO_METRICS_PORT": str(free_port()),
        }  # fmt: skip
        full = {**os.environ, **env}
        worker = subprocess.Popen([sys.executable, "-m", "varco.producer.cli", "worker", "--gpus", "cpu"],
                                  env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        gateway = subprocess.Popen([sys.executable, "-m", "varco.producer.cli", "gateway", "--port", str(port)],
                                   env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {KEY}"}
        try:
            wait_ready(base)
            client = Client(settings_from_env(env))
            job = {"image_uri": image, "task": "caption", "max_new_tokens": 1}
            next(client.wait(client.submit(**job), timeout=300))  # warm-up: the model is loaded
            with httpx.Client(base_url=base, headers=auth, timeout=120) as http:
                started = time.perf_counter()
                ids: list[str] = []
                for start in range(0, args.lines, 100):
                    answer = http.post("/v1/jobs/batch", json={"jobs": [job] * min(100, args.lines - start)})
                    answer.raise_for_status()
                    ids += answer.json()["job_ids"]
                statuses = list(client.wait(ids, timeout=3600))
                jobs_s = time.perf_counter() - started
                ok = sum(s.state.value == "succeeded" for s in statuses)

                content = [{"type": "text", "text": "Describe this image."},
                           {"type": "image_url", "image_url": {"url": image}}]  # fmt: skip
                body = {"model": "varco-vision", "messages": [{"role": "user", "content": content}], "max_tokens": 1}
                lines = "".join(json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
                                            "body": body}) + "\n" for n in range(args.lines))  # fmt: skip
                started = time.perf_counter()
                file_id = http.post("/v1/files", files={"file": ("in.jsonl", lines.encode())},
                                    data={"purpose": "batch"}).json()["id"]  # fmt: skip
                batch = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                       "completion_window": "24h"}).json()  # fmt: skip
                while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                    time.sleep(0.2)
                    batch = http.get(f"/v1/batches/{batch['id']}").json()
                batch_s = time.perf_counter() - started
        finally:
            for process in (gateway, worker):
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=120)
            redis.stop()
    print(f"{args.lines} caption jobs (64x64 PNG data: URI, max_tokens 1), one CPU worker node, batch {args.batch}")
    print(f"  POST /v1/jobs/batch x{(args.lines + 99) // 100}, then wait: {ok}/{args.lines} succeeded in "
          f"{jobs_s:.1f}s, {args.lines / jobs_s:.1f} lines/s")  # fmt: skip
    counts = batch["request_counts"]
    print(
        f"  Batch API (files.create, batches.create, until completed): {batch['status']}, "
        f"{counts['completed']}/{counts['total']} in {batch_s:.1f}s, {args.lines / batch_s:.1f} lines/s"
    )


if __name__ == "__main__":
    main()
