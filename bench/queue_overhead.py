"""The queue's own cost per job, against bare Celery on the same Redis, in one run.

Both sides get the same N jobs through one private redis-server and one worker process with the same
Celery configuration (JSON, late acks, prefetch 1, the same number of threads):
- bare Celery: a task that only counts itself (INCR), sent with `apply_async`;
- varco-queue: `Client.submit_many` of caption jobs on inline `data:` PNGs, the tiny model asked for 1
  token, through `varco worker --gpus cpu --no-callbacks` to a file result store, waited on with
  `Client.wait`: what is left is the queue's per-job work (status records, fetch, preprocessing,
  engine hand-off, parsing, result write, events), not inference.

Run: .venv/bin/python bench/queue_overhead.py [--jobs 500] [--profile out.txt] [--tracing] [--baseline REV]
`--profile` records the worker with py-spy (if installed) and prints where its time went.
`--tracing` times the varco side four times in the same run (issue 23): tracing off (no OTLP endpoint),
on at 100% sampling and at 1% (`parentbased_traceidratio`), exporting OTLP/HTTP to a local sink that
answers 200, and on at 100% towards a collector that refuses connections. The producer (this process) is
not traced: each job's spans are rooted in the worker, where the sampler decides.
`--baseline REV` adds a first varco run on the code of git revision REV (e.g. 588ecbf, main before tracing:
"the figure must not drop"): `git archive REV` is unpacked in a temporary folder and put first on the
PYTHONPATH of that run's producer and worker. Each varco run is its own process (producer and worker),
so every run, the baseline's included, gets the same treatment.
`--rounds R` runs the varco sides R times, interleaved (baseline, off, 100%, … then again), and reports each
side's median: on a shared machine a single run of a side moves by tens of percent.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from plain_png import plain_png

from varco.producer import Client
from varco.tasks.celery_app import create_app
from varco.tasks.settings import Settings, settings_from_env
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.devtools.tiny_model import make_tiny_model

VARCO_WORKER = [sys.executable, "-m", "varco.producer.cli", "worker", "--gpus", "cpu", "--no-callbacks"]
BARE_TASK = "bench.count"
COUNTER = "bench:done"


def bare_app(broker: str):
    app = create_app(Settings(broker_url=broker))  # the queue's own Celery configuration

    @app.task(name=BARE_TASK, acks_late=True)
    def count(job_id: str, request: dict, enqueued_at: str | None = None) -> None:
        redis.Redis.from_url(broker).incr(COUNTER)

    return app


def run_bare_worker(broker: str, threads: int) -> None:
    app = bare_app(broker)
    worker = app.Worker(
        hostname="bare@bench", pool="threads", concurrency=threads, queues=["varco"], loglevel="WARNING",
        without_gossip=True, without_mingle=True, without_heartbeat=True, optimization="fair",
    )  # fmt: skip
    worker.start()


def data_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(plain_png((64, 48))).decode()


def time_bare(broker: str, jobs: int, threads: int) -> float:
    worker = subprocess.Popen([sys.executable, __file__, "--bare-worker", broker, "--threads", str(threads)])
    try:
        client = redis.Redis.from_url(broker)
        app = bare_app(broker)
        request = {"image_uri": data_uri(), "task": "caption", "max_new_tokens": 1}
        app.send_task(BARE_TASK, args=["warm-up", request])
        _wait_counter(client, 1)
        client.delete(COUNTER)
        cpu_before = _cpu_seconds(worker.pid, own=True)
        started = time.perf_counter()
        for i in range(jobs):
            app.send_task(BARE_TASK, args=[f"job-{i}", request])
        _wait_counter(client, jobs)
        elapsed = time.perf_counter() - started
        cpu = _cpu_seconds(worker.pid, own=True) - cpu_before
        print(f"  bare worker process:  {cpu:.2f} CPU s ({1000 * cpu / jobs:.2f} ms per job) over {elapsed:.2f} s")
        return elapsed
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def _wait_counter(client: redis.Redis, target: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while int(client.get(COUNTER) or 0) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"bare Celery finished {client.get(COUNTER)} of {target}")
        time.sleep(0.01)


def time_varco(env: dict[str, str], jobs: int, profile: Path | None, threads: int) -> tuple[float, int, float]:
    worker = subprocess.Popen(
        [*VARCO_WORKER, "--concurrency", str(threads)],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    spy = None
    try:
        client = Client(settings_from_env(env))
        request = {"image_uri": data_uri(), "task": "caption", "max_new_tokens": 1}
        next(client.wait(client.submit(**request), timeout=300))  # the model is loaded once this is done
        if profile is not None:
            spy = _start_py_spy(worker.pid, profile)
        cpu_before = _cpu_seconds(worker.pid)
        started = time.perf_counter()
        ids = client.submit_many([request] * jobs)
        statuses = list(client.wait(ids, timeout=1800))
        elapsed = time.perf_counter() - started
        cpu = _cpu_seconds(worker.pid) - cpu_before
        print(f"  varco worker process: {cpu:.2f} CPU s ({1000 * cpu / jobs:.2f} ms per job) over {elapsed:.2f} s")
        return elapsed, sum(s.state.value == "succeeded" for s in statuses), cpu
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def time_varco_apart(env: dict[str, str], jobs: int, profile: Path | None, threads: int,
                     pythonpath: Path | None = None) -> tuple[float, int, float]:  # fmt: skip
    """`time_varco` in a process of its own: the producer and the worker import the code on `pythonpath`
    (a baseline revision) or this checkout's."""
    extra = {"PYTHONPATH": str(pythonpath)} if pythonpath else {}
    argv = [sys.executable, __file__, "--varco-side", json.dumps(env), "--jobs", str(jobs), "--threads", str(threads)]
    argv += ["--profile", str(profile)] if profile else []
    out = subprocess.run(argv, env={**os.environ, **extra}, stdout=subprocess.PIPE, text=True, check=True).stdout
    for line in out.splitlines():
        if not line.startswith("{"):
            print(line)
    elapsed, ok, cpu = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])["run"]
    return elapsed, ok, cpu


def _median_run(done: list[tuple[float, int, float]]) -> tuple[float, int, float]:
    """The median elapsed time and the median worker CPU of a side's rounds; succeeded jobs: the fewest."""
    return statistics.median(d[0] for d in done), min(d[1] for d in done), statistics.median(d[2] for d in done)


def baseline_tree(rev: str, root: Path) -> Path:
    """The code of `rev` importable as `varco` from the returned folder (put first on PYTHONPATH)."""
    tree = root / "baseline"
    tree.mkdir()
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev], stdout=subprocess.PIPE, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    package = root / "path" / "varco"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")  # a regular package: found before the editable install's mapping
    for folder in ("tasks", "producer", "workers", "gateway"):
        (package / folder).symlink_to(tree / folder)
    return package.parent


def otlp_sink() -> ThreadingHTTPServer:
    """A collector that reads each export and answers 200 (what a healthy collector costs the worker)."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def tracing_modes(sink: str) -> dict[str, dict[str, str]]:
    """The worker's extra environment per tracing mode."""
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    return {
        "tracing off (no endpoint)": {},
        "tracing on, 100% sampled": on | {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
        "tracing on, 1% sampled": on
        | {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
        "tracing on, 100%, collector refuses": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
    }


def _cpu_seconds(pid: int, own: bool = False) -> float:
    """User + system CPU seconds so far of a process (own) or of its children (Linux /proc)."""
    total = 0.0
    listed = [] if own else subprocess.run(["pgrep", "-P", str(pid)], capture_output=True).stdout.split()
    pids = [pid] if own else [int(p) for p in listed]
    for one in pids:
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _start_py_spy(supervisor_pid: int, out: Path) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed (pip install py-spy): no profile")
        return None
    child = subprocess.run(["pgrep", "-P", str(supervisor_pid)], capture_output=True, text=True).stdout.split()
    if not child:
        return None
    return subprocess.Popen(
        # --gil: only the thread holding the GIL is sampled, i.e. where the process's Python time goes
        [spy, "record", "--pid", child[0], "--format", "raw", "--output", str(out), "--rate", "200", "--nonblocking",
         "--gil"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def summarize_profile(path: Path, top: int = 25) -> None:
    """Inclusive share of samples per function (file:function), from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = {f.split(" (")[0] + " " + f.split("(")[-1].split(":")[0] for f in stack.split(";")}
        for frame in frames:
            inclusive[frame] += n
    print(f"profile: {total} samples of the worker process (all threads); inclusive share:")
    for frame, n in inclusive.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="worker threads (default: as varco worker)")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--tracing", action="store_true", help="the varco side with tracing off, on at 100%%, at 1%%")
    parser.add_argument("--rounds", type=int, default=1, help="run every varco side this many times, interleaved")
    parser.add_argument("--baseline", default=None, metavar="REV", help="a first varco run on git revision REV")
    parser.add_argument("--bare-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--varco-side", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        run_bare_worker(args.bare_worker, args.threads)
        return
    if args.varco_side:
        import varco.producer

        print(f"  (code: {Path(varco.producer.__file__).resolve().parents[1]})")
        print(json.dumps({"run": time_varco(json.loads(args.varco_side), args.jobs, args.profile, args.threads)}))
        return
    threads = args.threads or max(4, 2 * args.batch)  # by default what `varco worker` runs for the hf engine
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = start_redis(root)
        try:
            env = {
                "VARCO_BROKER_URL": server.url,
                "VARCO_MODEL": str(make_tiny_model(root / "model")),
                "VARCO_ENGINE": "hf",
                "VARCO_RESULT_STORE": (root / "results").as_uri() + "/",
                "VARCO_MAX_BATCH_SIZE": str(args.batch),
            }
            bare_s = time_bare(server.url, args.jobs, threads)
            sink = otlp_sink()
            modes = tracing_modes(f"http://127.0.0.1:{sink.server_port}") if args.tracing else {"": {}}
            sides: dict[str, tuple[dict[str, str], Path | None]] = {}
            if args.baseline:
                sides[f"code of {args.baseline} (baseline)"] = (env, baseline_tree(args.baseline, root))
            sides |= {mode: (env | extra, None) for mode, extra in modes.items()}
            rounds: dict[str, list[tuple[float, int, float]]] = {mode: [] for mode in sides}
            for round_no in range(args.rounds):
                for mode, (side_env, tree) in sides.items():
                    if mode or args.rounds > 1:
                        print(f"{mode} (round {round_no + 1} of {args.rounds})")
                    redis.Redis.from_url(server.url).flushdb()
                    rounds[mode].append(time_varco_apart(side_env, args.jobs, args.profile, threads, tree))
            runs = {mode: _median_run(done) for mode, done in rounds.items()}
            sink.shutdown()
        finally:
            server.stop()
    bare_rate = args.jobs / bare_s
    print(f"{args.jobs} jobs, one worker process, {threads} threads, one private redis-server"
          + (f"; medians of {args.rounds} interleaved rounds" if args.rounds > 1 else ""))  # fmt: skip
    print(f"  bare Celery (count-only task): {bare_s:6.2f}s  {bare_rate:7.1f} jobs/s")
    for mode, (varco_s, ok, cpu) in runs.items():
        varco_rate = args.jobs / varco_s
        print(f"  varco-queue (1 token, data:){', ' + mode if mode else ''}:  {varco_s:6.2f}s  {varco_rate:7.1f} "
              f"jobs/s  ({ok}/{args.jobs} succeeded)  ratio {varco_rate / bare_rate:.2f}x bare Celery, "
              f"worker CPU {1000 * cpu / args.jobs:.2f} ms/job")  # fmt: skip
    if args.profile is not None and args.profile.exists():
        summarize_profile(args.profile)


if __name__ == "__main__":
    main()
