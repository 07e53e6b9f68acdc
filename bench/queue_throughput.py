"""End-to-end jobs/s through the real queue: Client -> private redis-server -> one `varco worker --gpus cpu`.

Run: .venv/bin/python bench/queue_throughput.py [--jobs 500] [--max-new-tokens 1] [--batch 8]
Uses the tiny offline model and a file result store in a temporary directory; prints figures.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plain_png import plain_png

from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import start_redis
from varco.workers.devtools.tiny_model import make_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--max-new-tokens", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--wait-ms", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis = start_redis(root)
        images = root / "images"
        images.mkdir()
        (images / "a.png").write_bytes(plain_png((640, 480)))
        env = {
            "VARCO_BROKER_URL": redis.url,
            "VARCO_MODEL": str(make_tiny_model(root / "model")),
            "VARCO_RESULT_STORE": (root / "results").as_uri() + "/",
            "VARCO_FILE_ROOT": str(images),
            "VARCO_MAX_BATCH_SIZE": str(args.batch),
            "VARCO_MAX_WAIT_MS": str(args.wait_ms),
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "varco.producer.cli", "worker", "--gpus", "cpu", "--no-callbacks"],
            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = Client(settings_from_env(env))
            # Warm-up: the worker has loaded the model once this job is done.
            next(client.wait(client.submit((images / "a.png").as_uri(), "caption", max_new_tokens=1), timeout=120))
            uri = (images / "a.png").as_uri()
            started = time.perf_counter()
            ids = client.submit_many(
                [{"image_uri": uri, "task": "caption", "max_new_tokens": args.max_new_tokens}] * args.jobs
            )
            submitted = time.perf_counter() - started
            statuses = list(client.wait(ids, timeout=1800))
            elapsed = time.perf_counter() - started
            ok = sum(s.state.value == "succeeded" for s in statuses)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            redis.stop()
    print(f"{args.jobs} jobs (caption, 640x480 PNG via file://, max_new_tokens={args.max_new_tokens}), "
          f"one CPU worker, batch {args.batch}, wait {args.wait_ms} ms")  # fmt: skip
    print(f"  submitted in {submitted:.2f}s ({args.jobs / submitted:.0f} jobs/s)")
    print(f"  all finished in {elapsed:.2f}s: {ok}/{args.jobs} succeeded, {args.jobs / elapsed:.1f} jobs/s end to end")


if __name__ == "__main__":
    main()
