"""How long an S3 outage a job survives: one `varco worker --gpus cpu` writes results to a moto S3 server
reached through a TcpProxy that is cut while each job runs.

Run: .venv/bin/python bench/store_outage.py [--store-retry-s 20] [--outages 10,18,25] [--until-fail]
For each outage length a job is submitted right after the cut, and S3 comes back that many seconds after
the cut; the job's end is printed. `--until-fail` then keeps S3 cut for one more job until it fails: the
time from the cut to its failure bounds the outage any job survives with this VARCO_STORE_RETRY_S.
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

import boto3
from moto.server import ThreadedMotoServer
from plain_png import plain_png

from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.devtools.tcp_proxy import TcpProxy
from varco.workers.devtools.tiny_model import make_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store-retry-s", type=float, default=300.0)
    parser.add_argument("--outages", default="10", help="comma-separated outage lengths in seconds")
    parser.add_argument("--until-fail", action="store_true")
    args = parser.parse_args()
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis = start_redis(root)
        port = free_port()
        s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        s3_server.start()
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="bench-results")
        proxy = TcpProxy("127.0.0.1", port).start()
        images = root / "images"
        images.mkdir()
        (images / "a.png").write_bytes(plain_png((64, 48)))
        uri = (images / "a.png").as_uri()
        env = {
            "VARCO_BROKER_URL": redis.url,
            "VARCO_MODEL": str(make_tiny_model(root / "model")),
            "VARCO_RESULT_STORE": "s3://bench-results/jobs/",
            "VARCO_S3_ENDPOINT_URL": proxy.url,
            "VARCO_STORE_RETRY_S": str(args.store_retry_s),
            "VARCO_FILE_ROOT": str(images),
            "VARCO_METRICS_PORT": "0",
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "varco.producer.cli", "worker", "--gpus", "cpu", "--no-callbacks"],
            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        rows = []
        try:
            client = Client(settings_from_env({**env, "VARCO_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}))
            next(client.wait(client.submit(uri, "caption", max_new_tokens=1), timeout=300))  # model loaded
            for outage in [float(x) for x in args.outages.split(",") if x]:
                proxy.cut()
                cut_at = time.monotonic()
                job = client.submit(uri, "caption", max_new_tokens=1)
                time.sleep(max(0.0, outage - (time.monotonic() - cut_at)))
                proxy.restore()
                status = next(client.wait(job, timeout=args.store_retry_s + 300))
                rows.append((f"outage {outage:.0f}s", status, time.monotonic() - cut_at))
            if args.until_fail:
                proxy.cut()
                cut_at = time.monotonic()
                job = client.submit(uri, "caption", max_new_tokens=1)
                status = next(client.wait(job, timeout=args.store_retry_s + 300))
                rows.append(("cut until the job ends", status, time.monotonic() - cut_at))
                proxy.restore()
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            proxy.close()
            s3_server.stop()
            redis.stop()
    print(f"VARCO_STORE_RETRY_S={args.store_retry_s:g}, S3 cut (connections reset) from before each job's submit")
    for label, status, elapsed in rows:
        error = f" {status.error.type}" if status.error else ""
        print(f"  {label}: {status.state.value}{error}, attempts {status.attempts}, ended {elapsed:.1f}s after the cut")


if __name__ == "__main__":
    main()
