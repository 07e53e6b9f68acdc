"""Chaos under load: jobs on two worker nodes while a GPU child is killed, Redis restarts and S3 goes away.

Run: .venv/bin/python bench/chaos.py [--jobs 2000] [--max-new-tokens 4] [--s3-outage-s 20]

Everything is local: a private redis-server with AOF (as compose and Kubernetes run it), moto's S3 server
behind a TCP proxy that the bench cuts, a webhook receiver, and two `varco worker --gpus cpu` nodes on the
tiny offline model. The faults are triggered by progress, so they land while jobs run whatever the speed:
- at 10% finished: kill -9 one node's inference child (its jobs come back after the visibility timeout);
- at 30%: Redis is restarted (SIGTERM, then the same port and AOF file);
- at 50%: S3 is cut for `--s3-outage-s` seconds (connections reset, new ones refused).
Half the jobs belong to tenant teamA, half to teamB (weights 3:1: the fair queue's tickets, picks and releases
go through every fault too). Then every job must end `succeeded` with exactly one result object and one
terminal webhook. Prints the
figures: submitted, succeeded, failed, lost (no terminal state), duplicated (more than one terminal webhook
or result), the webhooks, and the wall time.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import psutil
from moto.server import ThreadedMotoServer
from plain_png import plain_png

from varco.producer import BrokerUnavailable, Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import LocalRedis, free_port, start_redis
from varco.workers.devtools.local_worker import local_worker
from varco.workers.devtools.tcp_proxy import TcpProxy
from varco.workers.devtools.tiny_model import make_tiny_model

BUCKET = "chaos-results"
TERMINAL = {"succeeded", "failed", "cancelled"}


class Receiver:
    """Counts terminal webhooks per job (every POST is answered 204)."""

    def __init__(self) -> None:
        self.events: collections.Counter[tuple[str, str]] = collections.Counter()
        self.ids: collections.Counter[str] = collections.Counter()  # webhook-id -> deliveries
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with outer.lock:
                    outer.events[(body["job_id"], body["type"])] += 1
                    outer.ids[self.headers.get("webhook-id", "")] += 1
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


def inference_child(supervisor: subprocess.Popen) -> psutil.Process:
    """The node's inference process (not its webhook process)."""
    for child in psutil.Process(supervisor.pid).children(recursive=True):
        cmdline = " ".join(child.cmdline())
        # Celery retitles its processes ("[celeryd: cpu0@host:MainProcess] …"); the webhook child has --callbacks.
        if ("varco.workers.runtime.main" in cmdline or "celeryd" in cmdline) and "--callbacks" not in cmdline:
            return child
    tree = [" ".join(c.cmdline()) for c in psutil.Process(supervisor.pid).children(recursive=True)]
    raise RuntimeError(f"the node has no inference child: {tree}")


def count_states(client: Client, ids: list[str]) -> collections.Counter[str]:
    try:
        statuses = client.statuses.get_many(ids)
    except Exception:  # Redis is restarting: ask again on the next tick
        return collections.Counter()
    return collections.Counter(s.state.value if s else "missing" for s in statuses.values())


TENANTS = ("teamA", "teamB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--s3-outage-s", type=float, default=20.0)
    parser.add_argument("--visibility-timeout", type=int, default=30)
    args = parser.parse_args()
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": "chaos", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    events: list[str] = []
    t0 = time.perf_counter()

    def mark(what: str) -> None:
        events.append(f"{time.perf_counter() - t0:7.1f}s  {what}")
        print(events[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "redis").mkdir()
        redis_server: LocalRedis = start_redis(root / "redis", persistent=True)
        s3_port = free_port()
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
        moto.start()
        s3_url = f"http://127.0.0.1:{s3_port}"
        s3 = boto3.client("s3", endpoint_url=s3_url)
        s3.create_bucket(Bucket=BUCKET)
        proxy = TcpProxy("127.0.0.1", s3_port).start()
        receiver = Receiver()
        images = root / "images"
        images.mkdir()
        (images / "a.png").write_bytes(plain_png((320, 240)))
        env = {
            "VARCO_BROKER_URL": redis_server.url,
            "VARCO_MODEL": str(make_tiny_model(root / "model")),
            "VARCO_RESULT_STORE": f"s3://{BUCKET}/jobs/",
            "VARCO_S3_ENDPOINT_URL": proxy.url,
            "VARCO_FILE_ROOT": str(images),
            "VARCO_ALLOW_PRIVATE_URLS": "true",
            "VARCO_VISIBILITY_TIMEOUT": str(args.visibility_timeout),
            "VARCO_MAX_ATTEMPTS": "5",
            "VARCO_KEEP_IMAGES": "false",
            "VARCO_METRICS_PORT": "0",
            "VARCO_TENANT_WEIGHTS": "teamA=3,teamB=1",
        }
        client = Client(settings_from_env(env))
        uri = (images / "a.png").as_uri()
        with (
            local_worker(env, root / "node-a.log", stop_timeout_s=90) as node_a,
            local_worker(env, root / "node-b.log", stop_timeout_s=90),
        ):
            # Both nodes have loaded the model once a job per node has run.
            warm = client.submit_many([{"image_uri": uri, "task": "caption", "max_new_tokens": 1}] * 4)
            list(client.wait(warm, timeout=300))
            mark("two nodes serving")
            t_submit = time.perf_counter()
            ids = client.submit_many(
                [
                    {
                        "image_uri": uri,
                        "task": "caption",
                        "max_new_tokens": args.max_new_tokens,
                        "callback_url": receiver.url,
                        "callback_events": ["job.succeeded", "job.failed"],
                        "metadata": {"n": n},
                        "tenant": TENANTS[n % 2],  # two tenants share the nodes (issue 19)
                    }
                    for n in range(args.jobs)
                ]
            )
            mark(f"{len(ids)} jobs submitted in {time.perf_counter() - t_submit:.1f}s")
            faults = [(0.10, "kill"), (0.30, "redis"), (0.50, "s3")]
            s3_cut_at: float | None = None
            deadline = time.monotonic() + 1800
            states: collections.Counter[str] = collections.Counter()
            while time.monotonic() < deadline:
                states = count_states(client, ids) or states
                done = sum(states[s] for s in TERMINAL)
                if faults and done >= faults[0][0] * len(ids):
                    _, fault = faults.pop(0)
                    if fault == "kill":
                        child = inference_child(node_a)
                        child.kill()
                        mark(f"kill -9 of node A's inference child (pid {child.pid}) at {done} done")
                    elif fault == "redis":
                        port = redis_server.port
                        redis_server.stop()
                        mark(f"Redis stopped at {done} done")
                        redis_server = start_redis(root / "redis", persistent=True, port=port)
                        mark("Redis started again (AOF)")
                    else:
                        proxy.cut()
                        s3_cut_at = time.monotonic()
                        mark(f"S3 cut at {done} done")
                if s3_cut_at is not None and time.monotonic() - s3_cut_at >= args.s3_outage_s:
                    proxy.restore()
                    s3_cut_at = None
                    mark("S3 restored")
                if done == len(ids) and not faults and s3_cut_at is None:
                    break
                time.sleep(0.5)
            wall = time.perf_counter() - t_submit
            mark(f"all terminal: {dict(states)}")
            # Terminal webhooks are queued when a job ends: give the last ones a moment to arrive.
            expected = set(ids)
            settle = time.monotonic() + 60
            while time.monotonic() < settle:
                with receiver.lock:
                    seen = {job for (job, _kind) in receiver.events}
                if expected <= seen:
                    break
                time.sleep(0.5)
            time.sleep(3)  # late duplicates, if any, would land now

        keys: collections.Counter[str] = collections.Counter()
        wanted = set(ids)  # the warm-up jobs' results are not counted
        paginator = s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=BUCKET, Prefix="jobs/"):
            for item in page.get("Contents", []):
                name = item["Key"].removeprefix("jobs/")
                if name.endswith(".json") and name.removesuffix(".json") in wanted:
                    keys[name.removesuffix(".json")] += 1
        with receiver.lock:
            hooks = dict(receiver.events)
            redelivered = {m: n for m, n in receiver.ids.items() if n > 1}
        try:
            final = client.statuses.get_many(ids)
        except BrokerUnavailable:
            final = {}
        proxy.close()
        moto.stop()
        redis_server.stop()

    succeeded = [j for j in ids if final.get(j) and final[j].state.value == "succeeded"]
    failed = [j for j in ids if final.get(j) and final[j].state.value == "failed"]
    lost = [j for j in ids if not final.get(j) or final[j].state.value not in TERMINAL]
    terminal_hooks = collections.Counter(
        {j: hooks.get((j, "job.succeeded"), 0) + hooks.get((j, "job.failed"), 0) for j in ids}
    )
    no_hook = [j for j in ids if terminal_hooks[j] == 0]
    dup_hooks = [j for j in ids if terminal_hooks[j] > 1]
    no_result = [j for j in succeeded if j not in keys]
    attempts = collections.Counter(final[j].attempts for j in ids if final.get(j))
    per_tenant = collections.Counter(final[j].tenant for j in succeeded)
    print()
    print(f"chaos: {args.jobs} caption jobs (max_new_tokens={args.max_new_tokens}), two CPU nodes, "
          f"visibility timeout {args.visibility_timeout}s, S3 outage {args.s3_outage_s:.0f}s")  # fmt: skip
    for line in events:
        print("  " + line)
    print(f"  submitted {len(ids)}, succeeded {len(succeeded)}, failed {len(failed)}, lost {len(lost)}")
    print(f"  terminal webhooks: {sum(terminal_hooks.values())} ({len(no_hook)} jobs without one, "
          f"{len(dup_hooks)} with more than one)")  # fmt: skip
    print(f"  webhook-ids delivered more than once (same id: receivers deduplicate): {redelivered}")
    print(f"  result objects: {len(keys)} ({len(no_result)} succeeded jobs without one)")
    print(f"  attempts per job: {dict(sorted(attempts.items()))}")
    print(f"  succeeded per tenant (weights teamA=3, teamB=1, half the jobs each): {dict(sorted(per_tenant.items()))}")
    print(f"  wall time from submit to all terminal: {wall:.1f}s ({len(ids) / wall:.1f} jobs/s)")
    ok = len(succeeded) == len(ids) and not no_hook and not dup_hooks and not no_result
    print("  PASS: every job succeeded once, one result, one terminal webhook" if ok else "  FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
