"""Redis commands and Redis CPU per job, by command (issue 24 §1).

Run: .venv/bin/python bench/redis_cost.py [--jobs 200] [--configs default,events]

One private redis-server, one `varco worker --gpus cpu` (its webhook process too) on the tiny offline model
with max_new_tokens=1 (a fast engine: the bench measures the queue, not inference), captions of one PNG via
file://. Three ways in, each `--jobs` jobs, one after another on the same worker:
- `submit+wait`: `Client.submit` per job, then one `Client.wait` on them all, no webhooks;
- `webhook`: the same with a `callback_url` (a local receiver, every event), delivered by the webhook process;
- `gateway`: `POST /v1/jobs` per job through `varco gateway`, then `GET /v1/jobs/{id}/result?wait=60` each.

Before each, `CONFIG RESETSTAT`; after the last job has ended, `INFO commandstats` (commands Lua scripts
run count too, as Redis counts them) and `INFO cpu` (used_cpu_user + used_cpu_sys: the whole server, idle
housekeeping and socket I/O included); "of it in commands" is the time Redis spent executing the commands
themselves (commandstats `usec`). Before the three, 5 s with nothing to do measure what Redis costs idle (the
worker's BRPOP polls, heartbeats, Redis's own cron): "net of idle" takes that rate off over each column's
wall time. Idle cost is per second, not per job: at production rates it vanishes into the jobs. The command
counts keep it (every process's idle polling, BRPOP timeouts and lease beats, lands in them), so a faster
run per job would read slightly lower.

`--configs` runs the three again on a worker and clients started with other settings, in the same run:
`default` (the settings as shipped: Celery task events off until Flower or `celery control enable_events`
turns them on) and `events` (VARCO_TASK_EVENTS=true: task events from the first job).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import redis
from plain_png import plain_png

from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.devtools.local_worker import local_worker
from varco.workers.devtools.tiny_model import make_tiny_model

KEY = "bench-key-0123456789abcdef"
CONFIGS = {"default": {}, "events": {"VARCO_TASK_EVENTS": "true"}}


class Receiver:
    """Answers every webhook 204 and counts them."""

    def __init__(self) -> None:
        self.count = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.count += 1
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


def cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class Measured:
    """Commands by name and Redis CPU seconds since `start`."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.calls: Counter[str] = Counter()
        self.usec: Counter[str] = Counter()  # Redis's own time in each command (commandstats), no I/O
        self.cpu = 0.0
        self.wall_s = 0.0

    def __enter__(self) -> Measured:
        self.r.config_resetstat()
        self._cpu0, self._t0 = cpu_s(self.r), time.monotonic()
        return self

    def __exit__(self, *_: object) -> None:
        self.cpu = cpu_s(self.r) - self._cpu0
        self.wall_s = time.monotonic() - self._t0
        for name, stat in self.r.info("commandstats").items():
            command = name.removeprefix("cmdstat_").upper()
            if command not in ("INFO", "CONFIG|RESETSTAT", "CONFIG"):
                self.calls[command] = int(stat["calls"])
                self.usec[command] = int(stat["usec"])


def wait_for_http(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def run_config(root: Path, base_env: dict[str, str], extra: dict[str, str], uri: str, n: int,
               receiver: Receiver) -> dict[str, Measured]:  # fmt: skip
    env = {**base_env, **extra}
    r = redis.Redis.from_url(env["VARCO_BROKER_URL"], decode_responses=True)
    results: dict[str, Measured] = {}
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "varco.producer.cli", "gateway", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with local_worker(env, root / f"worker-{len(extra)}.log"):
            wait_for_http(f"http://127.0.0.1:{port}/livez")
            client = Client(settings_from_env(env))
            list(client.wait(client.submit_many([{"image_uri": uri, "task": "caption"}] * 20), timeout=600))
            http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"})
            http.post("/v1/jobs", json={"image_uri": uri, "task": "caption"}).raise_for_status()
            time.sleep(2)  # the warm-up's tail (webhook process idle, leases released)
            with Measured(r) as idle:  # what Redis costs with nothing to do: polls, heartbeats, its own cron
                time.sleep(5)
            results["idle"] = idle

            for name, callback in (("submit+wait", None), ("webhook", receiver.url)):
                with Measured(r) as measured:
                    ids = [client.submit(uri, "caption", callback_url=callback) for _ in range(n)]
                    states = Counter(s.state.value for s in client.wait(ids, timeout=1800))
                    if callback:  # the webhooks are part of the cost: wait until each job's two are in
                        deadline = time.monotonic() + 120  # job.started and job.succeeded
                        while receiver.count < 2 * n and time.monotonic() < deadline:
                            time.sleep(0.1)
                        assert receiver.count == 2 * n, f"{receiver.count} webhooks for {n} jobs"
                        receiver.count = 0
                assert states == {"succeeded": n}, states
                results[name] = measured

            with Measured(r) as measured:
                ids = []
                for _ in range(n):
                    response = http.post("/v1/jobs", json={"image_uri": uri, "task": "caption"})
                    response.raise_for_status()
                    ids.append(response.json()["job_id"])
                for job_id in ids:
                    http.get(f"/v1/jobs/{job_id}/result", params={"wait": 60}, timeout=90).raise_for_status()
            results["gateway"] = measured
            client.close()
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--configs", default="default,events", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--top", type=int, default=14, help="commands listed by name")
    args = parser.parse_args()
    configs = args.configs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = start_redis(root)
        images = root / "images"
        images.mkdir()
        (images / "a.png").write_bytes(plain_png((640, 480)))
        env = {
            "VARCO_BROKER_URL": server.url,
            "VARCO_MODEL": str(make_tiny_model(root / "model")),
            "VARCO_RESULT_STORE": (root / "results").as_uri() + "/",
            "VARCO_FILE_ROOT": str(images),
            "VARCO_MAX_NEW_TOKENS": "1",
            "VARCO_METRICS_PORT": "0",
            "VARCO_API_KEYS": KEY,
            "VARCO_ALLOW_PRIVATE_URLS": "true",
            "VARCO_KEEP_IMAGES": "false",
        }
        receiver = Receiver()
        try:
            measured = {c: run_config(root, env, CONFIGS[c], (images / "a.png").as_uri(), args.jobs, receiver)
                        for c in configs}  # fmt: skip
        finally:
            server.stop()

    n = args.jobs
    columns = [(c, way) for way in ("submit+wait", "webhook", "gateway") for c in configs]
    print(f"{n} caption jobs per column; one CPU worker (tiny model, max_new_tokens=1); Redis per job")
    print("| | " + " | ".join(f"{way} ({c})" for c, way in columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    print("| commands | " + " | ".join(f"{sum(measured[c][w].calls.values()) / n:.1f}" for c, w in columns) + " |")
    print("| Redis CPU ms | " + " | ".join(f"{measured[c][w].cpu * 1000 / n:.3f}" for c, w in columns) + " |")
    print("| of it in commands ms | " + " | ".join(f"{sum(measured[c][w].usec.values()) / 1000 / n:.3f}"
                                               for c, w in columns) + " |")  # fmt: skip

    def net_ms(c: str, w: str) -> float:  # the idle rate over the same wall time taken off
        idle = measured[c]["idle"]
        return max(0.0, measured[c][w].cpu - idle.cpu / idle.wall_s * measured[c][w].wall_s) * 1000 / n

    print("| Redis CPU ms net of idle | " + " | ".join(f"{net_ms(c, w):.3f}" for c, w in columns) + " |")
    totals: Counter[str] = Counter()
    for c, w in columns:
        totals.update(measured[c][w].calls)
    for command, _ in totals.most_common(args.top):
        cells = " | ".join(f"{measured[c][w].calls[command] / n:.2f}" for c, w in columns)
        print(f"| {command} | {cells} |")
    idle_lines = ", ".join(
        f"{c}: {sum(m['idle'].calls.values()) / m['idle'].wall_s:.1f} commands/s, "
        f"{m['idle'].cpu / m['idle'].wall_s * 1000:.2f} ms CPU/s"
        for c, m in measured.items()
    )
    rest = [sum(v for k, v in measured[c][w].calls.items() if k not in dict(totals.most_common(args.top)))
            for c, w in columns]  # fmt: skip
    print("| others | " + " | ".join(f"{x / n:.2f}" for x in rest) + " |")
    print(f"Idle (5 s with the worker, its webhook process and the gateway up, no jobs): {idle_lines}")
    usec: Counter[str] = Counter()
    for c, w in columns:
        usec.update(measured[c][w].usec)
    print("\nTime Redis spent in each command, µs per job (EVALSHA's includes the commands its script ran):")
    print("| | " + " | ".join(f"{way} ({c})" for c, way in columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for command, _ in usec.most_common(args.top):
        print(f"| {command} | " + " | ".join(f"{measured[c][w].usec[command] / n:.1f}" for c, w in columns) + " |")


if __name__ == "__main__":
    main()
