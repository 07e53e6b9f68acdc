"""Jobs/s and CPU per job of every process, on Redis and on RabbitMQ, against bare Celery (issue 24 §3).

Run: .venv/bin/python bench/broker_throughput.py [--jobs 1500] [--threads 16] [--http-threads 16]
     [--brokers redis,rabbitmq,rabbitmq-3]   (defaults shown; about 5 minutes on 2 cores)

In one run, on private servers it starts itself for each broker (`redis`: one redis-server, broker and
status; `rabbitmq`: one RabbitMQ node, status on its own redis-server; `rabbitmq-3`: three RabbitMQ nodes
clustered on this machine, quorum queues replicated to all three, status on a redis-server), each broker
gets three sides, one after another, each `--jobs` jobs:
- bare Celery: a task that only counts itself (one INCR on a kept connection), sent with `send_task`,
  one worker process with the queue's own Celery configuration (JSON, late acks, prefetch 1; on RabbitMQ
  quorum queues and publisher confirms), `--threads` threads: what the broker and Celery cost by themselves;
- varco-queue: `Client.submit_many` of caption jobs on an inline 64x48 PNG (`data:` URI), the tiny model
  asked for 1 token (VARCO_MAX_NEW_TOKENS=1) through `varco worker --gpus cpu --no-callbacks` to a file
  result store, waited on with `Client.wait` (as bench/queue_overhead.py);
- gateway: the same jobs through `varco gateway` (one uvicorn process): `POST /v1/jobs`, then
  `GET /v1/jobs/{id}/result?wait=60`, from `--http-threads` client threads (16). Each waiting request
  subscribes to the one events channel, so every status event reaches every waiter: Redis CPU per job
  grows with the number of concurrent waits (run with more threads to see it).

CPU is user + system time over the timed part: the Redis server's (`INFO cpu`; the whole server, idle
housekeeping included), the RabbitMQ node's (its process tree from /proc via psutil: beam.smp and its
helpers), the worker's process tree (Celery's consumer, preprocessing, the engine hand-off, results; the
1-token tiny model's `generate` is inside it too, about 1 ms of a job), the gateway's, and this process
(the producer: submit and wait). CPU per job holds on a busy machine; jobs/s does not (2 shared cores
here: every process of the run competes for them), so read jobs/s as a ratio between sides of one run.
Each server's idle CPU rate (measured for a few seconds before its first side) is printed too: the
per-job figures include it.
"""

from __future__ import annotations

import argparse
import base64
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import redis
from plain_png import plain_png
from redis_cost import cpu_s as redis_cpu_s
from redis_cost import wait_for_http

from varco.producer import Client
from varco.tasks.celery_app import create_app, prepare_broker
from varco.tasks.settings import Settings, settings_from_env
from varco.workers.devtools.local_rabbitmq import start_cluster, start_rabbitmq
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.devtools.tiny_model import make_tiny_model

VARCO_CLI = [sys.executable, "-m", "varco.producer.cli"]
BARE_TASK = "bench.count"
COUNTER = "bench:done"
KEY = "bench-key-0123456789abcdef"
IDLE_S = 3.0


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of a process and its live descendants."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def own_cpu_s() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


@dataclass
class Side:
    broker: str
    name: str
    jobs: int
    elapsed: float = 0.0
    succeeded: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds over the timed part

    @property
    def rate(self) -> float:
        return self.jobs / self.elapsed

    def ms(self, role: str) -> float | None:
        return 1000 * self.cpu[role] / self.jobs if role in self.cpu else None


class Meters:
    """CPU seconds of each role's process(es), read before and after a timed part."""

    def __init__(self, readers: dict[str, Callable[[], float]]) -> None:
        self.readers = readers

    def read(self) -> dict[str, float]:
        return {role: read() for role, read in self.readers.items()}

    def idle_ms_per_s(self, seconds: float) -> dict[str, float]:
        before = self.read()
        time.sleep(seconds)
        after = self.read()
        return {role: 1000 * (after[role] - before[role]) / seconds for role in before}

    def timed(self, side: Side, run: Callable[[], int]) -> Side:
        before = self.read()
        started = time.perf_counter()
        side.succeeded = run()
        side.elapsed = time.perf_counter() - started
        after = self.read()
        side.cpu = {role: after[role] - before[role] for role in before}
        return side


def data_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(plain_png((64, 48))).decode()


def request() -> dict:
    return {"image_uri": data_uri(), "task": "caption", "max_new_tokens": 1}


def bare_app(broker: str, counter_url: str):
    app = create_app(Settings(broker_url=broker, status_url=counter_url))  # the queue's own Celery configuration
    counter = redis.Redis.from_url(counter_url)  # one pool for the process: one INCR per job, no connects

    @app.task(name=BARE_TASK, acks_late=True)
    def count(job_id: str, request: dict, enqueued_at: str | None = None) -> None:
        counter.incr(COUNTER)

    return app


def run_bare_worker(broker: str, counter_url: str, threads: int) -> None:
    app = bare_app(broker, counter_url)
    prepare_broker(app)  # as `varco worker` does: on RabbitMQ every queue (and delayed delivery) declared
    worker = app.Worker(
        hostname="bare@bench", pool="threads", concurrency=threads, queues=["varco"], loglevel="WARNING",
        without_gossip=True, without_mingle=True, without_heartbeat=True, optimization="fair",
    )  # fmt: skip
    worker.start()


def wait_counter(client: redis.Redis, target: int, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while (done := int(client.get(COUNTER) or 0)) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"bare Celery finished {done} of {target}")
        time.sleep(0.01)
    return done


def run_bare(side: Side, broker: str, counter_url: str, threads: int, meters: Meters) -> Side:
    argv = [sys.executable, __file__, "--bare-worker", broker, "--counter", counter_url, "--threads", str(threads)]
    worker = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        counter = redis.Redis.from_url(counter_url)
        counter.delete(COUNTER)
        app = bare_app(broker, counter_url)
        job = request()
        app.send_task(BARE_TASK, args=["warm-up", job])
        wait_counter(counter, 1)
        counter.delete(COUNTER)
        meters.readers["worker"] = lambda: tree_cpu_s(worker.pid)

        def run() -> int:
            for i in range(side.jobs):
                app.send_task(BARE_TASK, args=[f"job-{i}", job])
            return wait_counter(counter, side.jobs)

        return meters.timed(side, run)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def run_varco(side: Side, client: Client, meters: Meters) -> Side:
    def run() -> int:
        ids = client.submit_many([request()] * side.jobs)
        return sum(s.state.value == "succeeded" for s in client.wait(ids, timeout=1800))

    return meters.timed(side, run)


def run_gateway(side: Side, base_url: str, meters: Meters, http_threads: int) -> Side:
    headers = {"Authorization": f"Bearer {KEY}"}
    job = request()
    limits = httpx.Limits(max_connections=http_threads, max_keepalive_connections=http_threads)
    with httpx.Client(base_url=base_url, headers=headers, limits=limits, timeout=90) as http:

        def one(_: int) -> str:
            response = http.post("/v1/jobs", json=job)
            response.raise_for_status()
            result = http.get(f"/v1/jobs/{response.json()['job_id']}/result", params={"wait": 60})
            if result.status_code == 200:
                return "succeeded"
            try:
                detail = str(result.json().get("detail", ""))[:160]
            except ValueError:
                detail = result.text[:160]
            return f"{result.status_code} {detail}"

        one(0)  # warm-up: connections, the gateway's first request

        def run() -> int:
            with ThreadPoolExecutor(http_threads) as pool:
                states = Counter(pool.map(one, range(side.jobs)))
            if set(states) != {"succeeded"}:
                print(f"  gateway answers: {dict(states)}", flush=True)
            return states["succeeded"]

        return meters.timed(side, run)


def start_gateway(env: dict[str, str], stack: ExitStack) -> tuple[str, subprocess.Popen]:
    port = free_port()
    gateway = subprocess.Popen(
        [*VARCO_CLI, "gateway", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    stack.callback(lambda: (gateway.terminate(), gateway.wait(timeout=30)))
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/livez")
    return url, gateway


def start_worker(env: dict[str, str], threads: int, log: Path, stack: ExitStack) -> subprocess.Popen:
    with log.open("w") as out:
        worker = subprocess.Popen(
            [*VARCO_CLI, "worker", "--gpus", "cpu", "--no-callbacks", "--concurrency", str(threads)],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def stop() -> None:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)

    stack.callback(stop)
    return worker


def run_broker(broker: str, root: Path, model: Path, args: argparse.Namespace) -> tuple[list[Side], dict[str, float]]:
    """The three sides on one broker, each on servers started for this broker only."""
    with ExitStack() as stack:
        (root / f"redis-{broker}").mkdir()
        status = stack.enter_context(start_redis(root / f"redis-{broker}"))
        status_client = redis.Redis.from_url(status.url)
        readers: dict[str, Callable[[], float]] = {"redis": lambda: redis_cpu_s(status_client)}
        if broker == "rabbitmq":
            node = stack.enter_context(start_rabbitmq(root / "rabbitmq"))
            broker_url = node.url
            readers["rabbitmq"] = lambda: tree_cpu_s(node.process.pid)
        elif broker == "rabbitmq-3":
            # Three nodes on this one machine, clustered: each quorum queue has a leader and two followers
            # that every message is replicated to. The CPU column sums the three nodes.
            nodes = start_cluster(root / "rabbitmq-3", 3)
            for node in nodes:
                stack.callback(node.stop)
            broker_url = nodes[0].url
            readers["rabbitmq"] = lambda: sum(tree_cpu_s(node.process.pid) for node in nodes)
            for i, node in enumerate(nodes):
                readers[f"rabbitmq node {i}"] = functools.partial(tree_cpu_s, node.process.pid)
        else:
            broker_url = status.url
        readers["producer"] = own_cpu_s
        meters = Meters(readers)
        idle = meters.idle_ms_per_s(IDLE_S)
        env = {
            "VARCO_BROKER_URL": broker_url,
            "VARCO_MODEL": str(model),
            "VARCO_ENGINE": "hf",
            "VARCO_RESULT_STORE": (root / f"results-{broker}").as_uri() + "/",
            "VARCO_MAX_NEW_TOKENS": "1",
            "VARCO_METRICS_PORT": "0",
            "VARCO_API_KEYS": KEY,
        }
        if broker != "redis":
            env["VARCO_STATUS_URL"] = status.url
        print(f"{broker}: bare Celery", flush=True)
        jobs, threads = args.jobs, args.threads
        sides = [run_bare(Side(broker, "bare Celery", jobs), broker_url, status.url, threads, meters)]

        worker = start_worker(env, threads, root / f"worker-{broker}.log", stack)
        meters.readers["worker"] = lambda: tree_cpu_s(worker.pid)
        client = Client(settings_from_env(env))
        stack.callback(client.close)
        list(client.wait(client.submit_many([request()] * 16), timeout=600))  # model loaded, connections made
        print(f"{broker}: varco-queue", flush=True)
        sides.append(run_varco(Side(broker, "varco-queue", jobs), client, meters))

        url, gateway = start_gateway(env, stack)
        meters.readers["gateway"] = lambda: tree_cpu_s(gateway.pid)
        print(f"{broker}: gateway", flush=True)
        side = Side(broker, f"varco-queue via gateway ({args.http_threads} waits)", jobs)
        sides.append(run_gateway(side, url, meters, args.http_threads))
        return sides, idle


def cell(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def print_table(sides: list[Side], threads: int) -> None:
    print(f"\n{sides[0].jobs} jobs per side; one worker process ({threads} threads), tiny model, 1 token; "
          f"CPU ms per job (user + system) over the timed part")  # fmt: skip
    print("| broker | side | jobs/s | succeeded | Redis CPU ms | RabbitMQ CPU ms | worker CPU ms | gateway CPU ms "
          "| producer/client CPU ms |")  # fmt: skip
    print("| --- " * 9 + "|")
    for s in sides:
        print(f"| {s.broker} | {s.name} | {s.rate:.1f} | {s.succeeded}/{s.jobs} | {cell(s.ms('redis'), 3)} "
              f"| {cell(s.ms('rabbitmq'), 3)} | {cell(s.ms('worker'))} | {cell(s.ms('gateway'))} "
              f"| {cell(s.ms('producer'))} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1500, help="jobs per side")
    parser.add_argument("--threads", type=int, default=16, help="worker threads (as `varco worker` runs for hf)")
    parser.add_argument("--brokers", default="redis,rabbitmq,rabbitmq-3",
                        help="comma-separated: redis, rabbitmq (one node), rabbitmq-3 (a 3-node cluster)")  # fmt: skip
    parser.add_argument("--http-threads", type=int, default=16, help="gateway clients, each POST then GET ?wait")
    parser.add_argument("--bare-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--counter", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        run_bare_worker(args.bare_worker, args.counter, args.threads)
        return
    started = time.monotonic()
    sides: list[Side] = []
    idles: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model")
        for broker in args.brokers.split(","):
            done, idles[broker] = run_broker(broker, root, model, args)
            sides += done
    print_table(sides, args.threads)
    for s in sides:
        nodes = [f"{1000 * cpu / s.jobs:.3f}" for role, cpu in sorted(s.cpu.items()) if role.startswith("rabbitmq ")]
        if nodes:
            print(f"{s.broker}, {s.name}: RabbitMQ CPU ms per job by node: {', '.join(nodes)}")
    for broker, idle in idles.items():
        servers = ", ".join(f"{role} {idle[role]:.1f} CPU ms/s" for role in ("redis", "rabbitmq") if role in idle)
        print(f"idle before the {broker} sides: {servers}")
    print(f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {time.monotonic() - started:.0f} s in all, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
