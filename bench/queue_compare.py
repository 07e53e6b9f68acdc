"""The hf and vllm backends through the whole queue, side by side, and vLLM's offline `LLM.generate` on the same jobs.

`engine_compare.py` runs the mixed workload through the engine API in-process; this script sends the same jobs the
way a producer does: `Client.submit_many` -> a private redis-server -> `varco worker --gpus cpu --no-callbacks` (a
subprocess, one per backend, with the worker's own defaults for threads and batching) -> a file result store, waited
on with `Client.wait`. Each job's image is written as a PNG file under `VARCO_FILE_ROOT` and sent as a `file://` URI;
every job is scripted (the `varco_scripts.json` plugin, keyed by the PNG's sha256 and the task) to generate exactly
its budget, so both backends do the same work. Then vLLM's `LLM.generate` runs the same requests (the PNGs decoded
as the worker decodes them, the worker's prompts and sampling parameters, the same engine arguments), which gives
the ratio "vllm through the queue / LLM.generate" wall time.

Timed: from `submit_many` to the last job's final status. Each worker's start-up (model load, vLLM's engine build)
is excluded: the worker first runs 2 warm-up jobs. Job latency is from the job's status record, `created_at` (set by
the client at submit) to `finished_at` (set by the worker once the result is stored); the results'
`timings.total_s` (enqueue to result built, before the store write) is printed beside it as a cross-check.

Run (CPU, a few minutes):   .venv/bin/python bench/queue_compare.py
Both models:                .venv/bin/python bench/queue_compare.py --model both
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers

# engine_compare quiets vLLM's per-request notices at import (nothing before it imports vLLM).
from engine_compare import (
    Offline,
    bench_offline,
    console,
    cpu_seconds,
    free_memory,
    header,
    offline_inputs,
    vllm_engine_args,
)
from models import MODEL_NAMES, make_model, parameter_count
from queue_overhead import _cpu_seconds as worker_cpu_seconds
from rich.table import Table
from workload import Job, Summary, describe, mixed_jobs, percentile, warmup_jobs

from varco.producer import Client
from varco.tasks.prompts import TaskType
from varco.tasks.requests import validate_request
from varco.tasks.schemas import JobState
from varco.tasks.settings import Settings, settings_from_env
from varco.workers.devtools.local_redis import start_redis
from varco.workers.devtools.scripted import SCRIPTED_PLUGIN, SCRIPTS_FILE
from varco.workers.engines.base import GenerationRequest
from varco.workers.input.fetch import ImageFetcher

BACKENDS = ("hf", "vllm")
VARCO_WORKER = [sys.executable, "-m", "varco.producer.cli", "worker", "--gpus", "cpu", "--no-callbacks"]
# engine_compare's max_model_len at its CPU defaults (head-of-line budget 1024 + 4096): the same vLLM engine config,
# so its figures and these can be set side by side.
ENGINE_COMPARE_HOL_BUDGET = 1024


# --- the jobs as the queue sees them ------------------------------------------------------------------
@dataclass(frozen=True)
class QueueJob:
    job: Job  # the workload's job: task, budget, its image and model prompt
    request: dict[str, Any]  # what `Client.submit_many` is given
    engine_job: Job  # the job as the worker's engine sees it: the decoded PNG, the PNG's sha256, the model prompt


def queue_request(job: Job, path: Path) -> dict[str, Any]:
    """The producer-side request whose model prompt is the workload job's prompt."""
    request: dict[str, Any] = {"image_uri": path.as_uri(), "task": job.task.value, "max_new_tokens": job.budget}
    prompt = job.request.prompt
    if job.task is TaskType.REFERRING:
        # The workload renders a random region into the prompt; read it back (3 decimals, so it renders the same).
        box = re.search(r"<bbox>(.*?)</bbox>", prompt)
        label = re.search(r"<obj>(.*?)</obj>", prompt)
        if box is None or label is None:
            raise ValueError(f"not a referring prompt: {prompt!r}")
        request["region"] = [float(v) for v in box.group(1).split(",")]
        request["label"] = label.group(1)
    elif job.task is TaskType.VQA:
        request["prompt"] = prompt
    return request


def stage_jobs(jobs: Sequence[Job], kind: str, images: Path, settings: Settings) -> list[QueueJob]:
    """Write each job's image as a PNG under the file root and build its request and its engine-side twin.

    The twin comes from the worker's own fetcher (same bytes, same decoding, same hash) and the worker's own prompt
    builder, so the offline run gets exactly the inputs the worker gets.
    """
    fetcher = ImageFetcher(settings)
    staged = []
    try:
        for job in jobs:
            buffer = io.BytesIO()
            job.request.image.save(buffer, format="PNG")  # lossless: the worker decodes the same pixels
            path = images / f"{kind}-{job.index:03d}.png"
            path.write_bytes(buffer.getvalue())
            request = queue_request(job, path)
            prompt = validate_request(**request).model_prompt
            if prompt != job.request.prompt:
                raise RuntimeError(f"job {job.index}: the worker would ask {prompt!r}, not {job.request.prompt!r}")
            fetched = fetcher.fetch(request["image_uri"])
            engine_request = GenerationRequest(fetched.image, prompt, job.budget, fetched.sha256)
            staged.append(QueueJob(job, request, Job(job.index, job.task, job.budget, engine_request)))
    finally:
        fetcher.close()
    return staged


def write_scripts(model_dir: Path, jobs: Sequence[QueueJob]) -> None:
    """Force each job to generate exactly its budget: one byte-level token per "a", never an early EOS.

    Keyed by task: the images are all distinct noise, so "{image sha256}:{task}" names one job.
    """
    scripts = {f"{q.engine_job.request.image_id}:{q.job.task.value}": "a" * q.job.budget for q in jobs}
    if len(scripts) != len(jobs):
        raise RuntimeError("two jobs share an image and a task: their scripts would collide")
    (model_dir / SCRIPTS_FILE).write_text(json.dumps(scripts), encoding="utf-8")


# --- the worker ---------------------------------------------------------------------------------------
def worker_env(backend: str, model_dir: Path, root: Path, broker: str, args: argparse.Namespace) -> dict[str, str]:
    env = {
        "VARCO_BROKER_URL": broker,
        "VARCO_MODEL": str(model_dir),
        "VARCO_ENGINE": backend,
        "VARCO_RESULT_STORE": (root / "results").as_uri() + "/",
        "VARCO_FILE_ROOT": str(root / "images"),
        "VARCO_MAX_NEW_TOKENS": str(args.max_budget),  # jobs pass their own budgets; this is only the default
        "VARCO_ENGINE_PLUGINS": SCRIPTED_PLUGIN,
        "VLLM_CACHE_ROOT": str(root / "vllm-cache"),  # leave ~/.cache alone
    }
    if backend == "hf":
        env |= {"VARCO_MAX_BATCH_SIZE": str(args.max_batch_size), "VARCO_MAX_WAIT_MS": str(args.max_wait_ms)}
    else:
        env |= {
            "VARCO_GPU_MEMORY_UTILIZATION": str(args.gpu_memory_utilization),
            "VARCO_MAX_NUM_SEQS": str(args.max_num_seqs),
            "VARCO_MAX_MODEL_LEN": str(max(args.max_budget, ENGINE_COMPARE_HOL_BUDGET) + 4096),
            "VARCO_VLLM_ENGINE_ARGS": json.dumps(vllm_engine_args(args)),  # engine_compare's: eager, fixed KV cache
        }
    return env


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def wait_all(client: Client, ids: Sequence[str], timeout: float, worker: subprocess.Popen, log: Path) -> list[Any]:
    """Every job's final status, failing early (with the worker's log) if the worker exits or keeps dying."""
    pending, done = set(ids), []
    deadline = time.monotonic() + timeout
    while pending:
        try:
            for status in client.wait(set(pending), timeout=max(1.0, min(15.0, deadline - time.monotonic()))):
                pending.discard(status.job_id)
                done.append(status)
        except TimeoutError:
            # The supervisor restarts a child that dies (or gives up and exits): either way, no point waiting on.
            died = worker.poll() is not None or "exited with" in log.read_text(errors="replace")
            if died or time.monotonic() >= deadline:
                raise RuntimeError(f"{len(pending)} job(s) unfinished; worker log:\n{log_tail(log)}") from None
    return done


def stop_worker(worker: subprocess.Popen) -> None:
    """SIGTERM is the worker's warm shutdown (the supervisor passes it on and ends the child's process group)."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=180)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


@dataclass
class QueueRun:
    model: str
    backend: str
    start_s: float  # worker start to its warm-up jobs done: not in the timings
    summary: Summary
    worker_cpu_s: float  # the worker process's user+system time over the timed part
    total_s: list[float]  # the results' timings.total_s
    failed: int = 0
    notes: list[str] = field(default_factory=list)


def run_queue(
    backend: str,
    name: str,
    env: dict[str, str],
    warm: Sequence[QueueJob],
    jobs: Sequence[QueueJob],
    log: Path,
    args: argparse.Namespace,
) -> QueueRun:
    started = time.perf_counter()
    with log.open("wb") as out:
        worker = subprocess.Popen(VARCO_WORKER, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    client = Client(settings_from_env(env))
    try:
        # The model is loaded, the engine built and first-call costs paid once these are done.
        warm_ids = client.submit_many([q.request for q in warm])
        if any(s.state is not JobState.SUCCEEDED for s in wait_all(client, warm_ids, args.start_timeout, worker, log)):
            raise RuntimeError(f"{backend}: a warm-up job failed; worker log:\n{log_tail(log)}")
        start_s = time.perf_counter() - started
        cpu = worker_cpu_seconds(worker.pid)
        t0 = time.perf_counter()
        ids = client.submit_many([q.request for q in jobs])
        final = wait_all(client, ids, args.timeout, worker, log)
        wall = time.perf_counter() - t0
        worker_cpu = worker_cpu_seconds(worker.pid) - cpu
    finally:
        stop_worker(worker)
    failed = [s for s in final if s.state is not JobState.SUCCEEDED]
    records = client.statuses.get_many(list(ids))  # full records: the wait's events carry no timestamps
    latencies, total_s, out_tokens, prompt_tokens, exact = [], [], 0, 0, not failed
    for job_id, q in zip(ids, jobs, strict=True):
        status = records[job_id]
        if status is None or status.state is not JobState.SUCCEEDED:
            continue
        result = client.result(job_id)
        latencies.append((status.finished_at - status.created_at).total_seconds())
        total_s.append(result.timings.total_s)
        out_tokens += result.usage.output_tokens
        prompt_tokens += result.usage.prompt_tokens
        exact &= result.usage.output_tokens == q.job.budget
    client.close()
    summary = Summary(
        jobs=len(jobs),
        wall_s=wall,
        output_tokens=out_tokens,
        prompt_tokens=prompt_tokens,
        p50_s=statistics.median(latencies) if latencies else float("nan"),
        p95_s=percentile(latencies, 95),
        exact=exact,
    )
    run = QueueRun(name, backend, start_s, summary, worker_cpu, total_s, len(failed))
    if failed:
        errors = sorted({f"{s.error.type}: {s.error.message}" for s in failed if s.error})
        run.notes.append(f"{len(failed)} job(s) failed: {'; '.join(errors)[:300]}")
    elif not exact:
        run.notes.append("some jobs did not generate exactly their budget")
    return run


# --- vLLM offline -------------------------------------------------------------------------------------
def run_offline(env: dict[str, str], warm: Sequence[QueueJob], jobs: Sequence[QueueJob], repeats: int) -> Offline:
    """`LLM.generate` on the worker's inputs, with the engine arguments and sampling params of a vllm engine built
    in this process from the worker's own settings (the scripted plugin included), as engine_compare does."""
    from varco.workers.engines import create_engine

    os.environ.setdefault("VLLM_CACHE_ROOT", env["VLLM_CACHE_ROOT"])
    engine = create_engine(settings_from_env(env)).load()
    try:
        inputs = offline_inputs(engine, [q.engine_job for q in [*warm, *jobs]])
    finally:
        engine.stop()
        del engine
        free_memory()
    return bench_offline(inputs, len(warm), repeats)


# --- report -------------------------------------------------------------------------------------------
def table(runs: Sequence[QueueRun], offline: dict[str, Offline]) -> Table:
    result = Table(title="Mixed workload through the queue (Client -> Redis -> varco worker -> file store)")
    columns = ["model", "path", "start s", "wall s", "img/s", "out tok/s", "p50 s", "p95 s", "cpu s", "prompt tok"]
    for column in columns:
        result.add_column(column, justify="left" if column in ("model", "path") else "right")
    for run in runs:
        m = run.summary
        result.add_row(
            run.model,
            f"{run.backend} via queue" + ("" if m.exact else " (!)"),
            f"{run.start_s:.1f}",
            f"{m.wall_s:.2f}",
            f"{m.jobs_per_s:.2f}",
            f"{m.tokens_per_s:.0f}",
            f"{m.p50_s:.2f}",
            f"{m.p95_s:.2f}",
            f"{run.worker_cpu_s:.1f}",
            f"{m.prompt_tokens}",
        )
        if run.backend == "vllm" and (off := offline.get(run.model)) is not None:
            for where, label in (("main", "main thread"), ("thread", "fresh thread")):
                wall, cpu = off.median(where)
                row = [run.model, f"vllm LLM.generate, {label}", "", f"{wall:.2f}", f"{off.jobs / wall:.2f}"]
                result.add_row(*row, f"{off.tokens / wall:.0f}", "", "", f"{cpu:.1f}", "")
    return result


def report(runs: Sequence[QueueRun], offline: dict[str, Offline]) -> None:
    console.print(table(runs, offline))
    console.print(
        "start s: worker start to its 2 warm-up jobs done (not timed). wall: submit_many to the last final status. "
        "p50/p95: status created_at -> finished_at. cpu s: the worker process (queue rows) or this process "
        "(LLM.generate rows) over the timed part. (!): not every job generated exactly its budget."
    )
    for run in runs:
        exact = "all jobs generated exactly their budget" if run.summary.exact else "NOT all jobs exact"
        total = run.total_s
        console.print(
            f"{run.model} {run.backend}: {run.summary.jobs - run.failed}/{run.summary.jobs} succeeded, {exact}, "
            f"{run.summary.output_tokens} output tokens; results' timings.total_s p50 {percentile(total, 50):.2f}s "
            f"p95 {percentile(total, 95):.2f}s" + "".join(f"; {n}" for n in run.notes)
        )
    for name, off in offline.items():
        queue = next((r for r in runs if r.model == name and r.backend == "vllm"), None)
        if queue is None:
            continue
        for where, label in (("main", "from the main thread"), ("thread", "from a fresh thread")):
            wall, _ = off.median(where)
            console.print(
                f"{name}: vllm through the queue {queue.summary.wall_s:.2f}s vs LLM.generate {label} {wall:.2f}s "
                f"-> ratio {queue.summary.wall_s / wall:.2f}"
            )
        console.print(f"{name}: LLM.generate produced {off.tokens} output tokens for {off.jobs} jobs")


# --- main ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*MODEL_NAMES, "both"], default="medium")
    parser.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    parser.add_argument("--jobs", type=int, default=24, help="jobs in the mixed workload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-budget", type=int, default=512, help="the largest budget the mix draws")
    parser.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True, help="vLLM LLM.generate")
    parser.add_argument("--repeats", type=int, default=1, help="LLM.generate runs per thread; the median is shown")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds for a worker to finish warm-up")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the timed jobs")
    # The worker's defaults (tasks/settings.py), except where CPU needs otherwise (as engine_compare).
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=int, default=20)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    parser.add_argument("--cpu-kv-gib", type=float, default=1.0, help="vLLM's KV cache on CPU")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True, help="vLLM enforce_eager")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    header()
    models = list(MODEL_NAMES) if args.model == "both" else [args.model]
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    jobs, warm = mixed_jobs(args.jobs, args.seed, args.max_budget), warmup_jobs()
    console.print(f"workload: {describe(jobs)}")
    runs: list[QueueRun] = []
    offline: dict[str, Offline] = {}
    started, cpu = time.perf_counter(), cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="queue-compare-") as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        server = start_redis(root)
        try:
            settings = settings_from_env({"VARCO_BROKER_URL": server.url, "VARCO_FILE_ROOT": str(root / "images")})
            staged_warm = stage_jobs(warm, "warm", root / "images", settings)
            staged = stage_jobs(jobs, "job", root / "images", settings)
            for name in models:
                model_dir = make_model(name, root)
                write_scripts(model_dir, [*staged_warm, *staged])
                console.print(f"[bold]{name}[/]: {parameter_count(model_dir) / 1e6:.2f}M parameters")
                for backend in backends:
                    t = time.perf_counter()
                    env = worker_env(backend, model_dir, root, server.url, args)
                    log = root / f"worker-{name}-{backend}.log"
                    run = run_queue(backend, name, env, staged_warm, staged, log, args)
                    runs.append(run)
                    notes = "".join(f"; {n}" for n in run.notes)
                    console.print(f"  {backend} via queue: done in {time.perf_counter() - t:.0f}s{notes}")
                if args.offline and "vllm" in backends:
                    t = time.perf_counter()
                    env = worker_env("vllm", model_dir, root, server.url, args)
                    offline[name] = run_offline(env, staged_warm, staged, args.repeats)
                    console.print(f"  vllm LLM.generate: done in {time.perf_counter() - t:.0f}s")
        finally:
            with contextlib.suppress(Exception):
                server.stop()
    console.print()
    report(runs, offline)
    load = f", load average now {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    console.print(
        f"total {time.perf_counter() - started:.0f}s (worker and engine start-ups included; this process "
        f"{cpu_seconds() - cpu:.0f} CPU s){load}"
    )


if __name__ == "__main__":  # vLLM may start processes that import this module
    sys.exit(main())
