"""The hf and vllm engine backends side by side: same model, same mixed workload, one run.

For each model (`tiny`: the project's ~150k-parameter model, overhead only; `medium`: ~50M random
parameters, where compute dominates) the script builds the hf engine, runs the workload, stops it,
then does the same with the vllm engine, and finally runs the same requests through vLLM's offline
`LLM.generate` (same engine arguments, same scripted outputs) to show what the engine API costs on
top of vLLM itself. Every job is scripted to generate exactly its budget, so both backends do the
same work. Jobs go in the way a worker's task threads send them: all at once, each thread calling
`prepare`, `submit` and waiting on its future. Latency is from that hand-over to the job's result.

`LLM.generate` is timed twice: from the main thread, and from a fresh thread. On CPU, torch ops run
~1.8x slower in a thread other than the one whose OpenMP team did the first parallel work, which
is why the vllm backend builds its engine on the engine thread itself (see `in_thread`).

The head-of-line scenario submits one long job, then 4 short ones while it runs: a static batch
(hf) makes the short ones wait for the long one; continuous batching (vllm) lets them through.

Run (CPU, a few minutes):   .venv/bin/python bench/engine_compare.py
Bigger:                     .venv/bin/python bench/engine_compare.py --jobs 200 --model medium --hol-budget 8192
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# vLLM reads its logging level at import: keep its per-request notices out of the tables.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import torch
import transformers
from models import MODEL_NAMES, make_model, parameter_count
from rich.console import Console
from rich.table import Table
from workload import (
    Job,
    Summary,
    describe,
    head_of_line_jobs,
    mixed_jobs,
    reset_caches,
    run_jobs,
    script,
    summarise,
    warmup_jobs,
)

from varco.workers.devtools.scripted import ScriptBook, install
from varco.workers.engines.base import EngineBackend

BACKENDS = ("hf", "vllm")
# Wide enough for the tables when the output goes to a file (rich assumes 80 columns there).
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


@dataclass
class HeadOfLine:
    long_budget: int
    short_budget: int
    delay_s: float  # between the long job's submit and the short ones'
    long_s: float  # the long job's latency from its submit
    short_s: list[float]  # each short job's latency from its own submit

    @property
    def shorts_first(self) -> bool:
        """Whether every short job finished before the long one (on one clock: the long job's submit)."""
        return self.delay_s + max(self.short_s) < self.long_s


@dataclass
class Timed:
    """One timed run of the mixed workload: its summary and the CPU time this process used meanwhile."""

    summary: Summary
    cpu_s: float


@dataclass
class BackendRun:
    model: str
    backend: str
    load_s: float
    mixed: list[Timed] = field(default_factory=list)  # one per repeat
    head_of_line: HeadOfLine | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> Timed | None:
        return median_run(self.mixed)


def median_run(runs: Sequence[Timed]) -> Timed | None:
    """The repeat with the median wall time (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: r.summary.wall_s)
    return ordered[(len(ordered) - 1) // 2] if ordered else None


def cpu_seconds() -> float:
    """User + system time of this process, all threads: on a shared machine, wall time alone misleads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- engines ----------------------------------------------------------------------------------------
def build_engine(backend: str, model_dir: Path, args: argparse.Namespace) -> EngineBackend:
    if backend == "hf":
        from varco.workers.engines.hf import HFEngine

        return HFEngine(
            str(model_dir),
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_batch_tokens=args.max_batch_tokens,
        )
    from varco.workers.engines.vllm import VLLMEngine, configure_cpu_defaults

    configure_cpu_defaults()
    return VLLMEngine(
        str(model_dir),
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_model_len=max_model_len(args),
        engine_args=vllm_engine_args(args),
    )


def max_model_len(args: argparse.Namespace) -> int:
    # Room for the longest job (the head-of-line one) and the largest image prompt (under 1k tokens here).
    return max(args.max_budget, args.hol_budget) + 4096


def vllm_engine_args(args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, Any] = {"enforce_eager": args.eager}
    if not torch.cuda.is_available():
        # On CPU vLLM sizes its KV cache as a share of RAM minus what the process holds already, which
        # after the hf engine can leave too little for all jobs at once; a fixed size keeps runs comparable.
        extra["kv_cache_memory_bytes"] = int(args.cpu_kv_gib * 2**30)
    return extra


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_head_of_line(engine: EngineBackend, jobs: Sequence[Job], delay_s: float) -> HeadOfLine:
    """Submit the long job, give it `delay_s` to start, then submit the short ones together."""
    long_job, shorts = jobs[0], jobs[1:]
    started = time.perf_counter()
    long_done: list[float] = []

    def record(_: Future) -> None:
        long_done.append(time.perf_counter() - started)

    future = engine.submit(engine.prepare(long_job.request))
    future.add_done_callback(record)
    time.sleep(delay_s)
    shorts_at = time.perf_counter() - started
    results, _ = run_jobs(engine, shorts)
    future.result()
    return HeadOfLine(long_job.budget, shorts[0].budget, shorts_at, long_done[0], [r.latency_s for r in results])


def bench_backend(
    backend: str, name: str, model_dir: Path, jobs: list[Job], hol: list[Job], args: argparse.Namespace
) -> tuple[BackendRun, Any]:
    """One backend on one model; for vllm also returns what the offline run needs (engine args, prompts, params)."""
    warm = warmup_jobs()
    book = ScriptBook({})
    script(book, [*warm, *jobs, *hol])
    engine = build_engine(backend, model_dir, args)
    install(engine, book)  # before load: vLLM takes its logits processors at start-up
    engine.load()
    run = BackendRun(name, backend, engine.load_seconds)
    offline = None
    try:
        run_jobs(engine, warm)  # first-call costs (allocator, kernels) out of the timings
        for _ in range(args.repeats if args.mixed else 0):
            reset_caches(engine)
            cpu = cpu_seconds()
            summary = summarise(*run_jobs(engine, jobs, args.threads))
            run.mixed.append(Timed(summary, cpu_seconds() - cpu))
            if not summary.exact:
                run.notes.append("some jobs did not generate exactly their budget")
        if args.head_of_line:
            run.head_of_line = run_head_of_line(engine, hol, args.hol_delay)
        if backend == "vllm" and args.offline and args.mixed:
            offline = offline_inputs(engine, [*warm, *jobs])
    finally:
        engine.stop()
        del engine
        free_memory()
    return run, offline


# --- vLLM offline ---------------------------------------------------------------------------------
def offline_inputs(engine: Any, jobs: Sequence[Job]) -> tuple[Any, list[dict[str, Any]], list[Any]]:
    """The loaded VLLMEngine's own engine args and sampling params (scripted outputs included), and plain
    prompt dicts: what a caller of `LLM.generate` would pass."""
    prompts = [
        {"prompt": engine.chat_text(job.request.prompt), "multi_modal_data": {"image": job.request.image}}
        for job in jobs
    ]
    params = [engine.sampling_params(job.request) for job in jobs]
    engine_args = engine.engine_args()
    # `LLM` resolves some defaults differently (a larger prefill chunk on CPU): pin the engine's own.
    engine_args.max_num_batched_tokens = engine.engine.vllm_config.scheduler_config.max_num_batched_tokens
    return engine_args, prompts, params


@dataclass
class Offline:
    """`LLM.generate` over the workload, per repeat: called from the main thread, and from a fresh thread as the
    engine API's engine thread calls `step` (see `in_thread` for why the two differ on CPU)."""

    walls: dict[str, list[float]] = field(default_factory=lambda: {"main": [], "thread": []})
    cpu_s: dict[str, list[float]] = field(default_factory=lambda: {"main": [], "thread": []})
    tokens: int = 0
    jobs: int = 0

    def median(self, where: str) -> tuple[float, float]:
        """(wall, cpu) of the repeat with the median wall time."""
        walls = self.walls[where]
        i = sorted(range(len(walls)), key=walls.__getitem__)[(len(walls) - 1) // 2]
        return walls[i], self.cpu_s[where][i]


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run `fn` in a new thread that exits afterwards.

    Measured on CPU (2 cores): vLLM's steps run ~1.8x slower on the tiny model while a second live thread holds
    an OpenMP team, whichever thread steps; they are fast again once that thread exits. The likely cause is
    libgomp, which keeps a team per thread that has run a parallel op and, once its threads outnumber the
    cores, spins only briefly before sleeping, costly for vLLM's many small ops. The engine API is in that state
    (engine built in the caller's thread, steps in the engine thread); `LLM.generate` from the main thread is
    not. A thread that exits after each run keeps the main-thread runs clean.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="offline")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def bench_offline(inputs: tuple[Any, list[dict[str, Any]], list[Any]], warm: int, repeats: int) -> Offline:
    """`LLM.generate` over the workload (after a warm-up call), `repeats` times from each thread."""
    from vllm import LLM

    engine_args, prompts, params = inputs
    llm = LLM.from_engine_args(engine_args)
    result = Offline(jobs=len(prompts) - warm)

    def generate(llm: Any = llm) -> list[Any]:
        return llm.generate(prompts[warm:], params[warm:], use_tqdm=False)

    try:
        llm.generate(prompts[:warm], params[:warm], use_tqdm=False)
        for _ in range(repeats):
            for where in ("main", "thread"):
                reset_caches(llm)
                cpu = cpu_seconds()
                started = time.perf_counter()
                outputs = generate() if where == "main" else in_thread(generate)
                result.walls[where].append(time.perf_counter() - started)
                result.cpu_s[where].append(cpu_seconds() - cpu)
                result.tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    finally:
        shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        free_memory()
    return result


# --- report ---------------------------------------------------------------------------------------
def header() -> None:
    import vllm

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    console.print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}; "
        f"{cores} cores ({os.cpu_count()} online), torch threads {torch.get_num_threads()}, device {device}"
    )
    if hasattr(os, "getloadavg"):
        console.print(f"load average before the run: {os.getloadavg()[0]:.2f} (other processes share these cores)")


def mixed_table(runs: list[BackendRun], offline: dict[str, Offline], repeats: int) -> Table:
    title = "Mixed workload: all jobs submitted at once from task threads"
    if repeats > 1:
        title += f" (the median-wall repeat of {repeats}; all walls in the last column)"
    table = Table(title=title)
    columns = ["model", "backend", "load s", "wall s", "img/s", "out tok/s", "p50 s", "p95 s", "cpu s", "prompt tok"]
    if repeats > 1:
        columns.append("walls s")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "backend", "walls s") else "right")
    for run in runs:
        if (timed := run.median) is None:
            continue
        m = timed.summary
        row = [
            run.model,
            run.backend + ("" if m.exact else " (!)"),
            f"{run.load_s:.1f}",
            f"{m.wall_s:.2f}",
            f"{m.jobs_per_s:.2f}",
            f"{m.tokens_per_s:.0f}",
            f"{m.p50_s:.2f}",
            f"{m.p95_s:.2f}",
            f"{timed.cpu_s:.1f}",
            f"{m.prompt_tokens}",
        ]
        if repeats > 1:
            row.append(" ".join(f"{t.summary.wall_s:.2f}" for t in run.mixed))
        table.add_row(*row)
        if run.backend == "vllm" and (off := offline.get(run.model)) is not None:
            for where, label in (("main", "main thread"), ("thread", "fresh thread")):
                wall, cpu = off.median(where)
                row = [run.model, f"vllm LLM.generate, {label}", "", f"{wall:.2f}", f"{off.jobs / wall:.2f}"]
                row += [f"{off.tokens / wall:.0f}", "", "", f"{cpu:.1f}", ""]
                if repeats > 1:
                    row.append(" ".join(f"{w:.2f}" for w in off.walls[where]))
                table.add_row(*row)
    return table


def head_of_line_table(runs: list[BackendRun], shorts: int, delay_s: float) -> Table:
    table = Table(title=f"Head of line: 1 long job, then {shorts} short ones {delay_s:.1f} s later")
    for column in ("model", "backend", "long budget", "long job s", "short budget", "shorts p50 s", "shorts max s"):
        table.add_column(column, justify="left" if column in ("model", "backend") else "right")
    table.add_column("shorts done before long?")
    for run in runs:
        h = run.head_of_line
        if h is None:
            continue
        table.add_row(
            run.model,
            run.backend,
            str(h.long_budget),
            f"{h.long_s:.2f}",
            str(h.short_budget),
            f"{statistics.median(h.short_s):.2f}",
            f"{max(h.short_s):.2f}",
            "yes" if h.shorts_first else "no",
        )
    return table


# --- main -------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*MODEL_NAMES, "both"], default="both")
    parser.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    # CPU defaults keep the whole run to a few minutes on 2 cores.
    parser.add_argument("--jobs", type=int, default=48 if gpu else 24, help="jobs in the mixed workload")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the mixed workload; the median is shown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-budget", type=int, default=512, help="the largest budget the mix draws")
    parser.add_argument("--threads", type=int, default=None, help="task threads (default: one per job)")
    parser.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True, help="the mixed workload")
    parser.add_argument("--head-of-line", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--hol-budget", type=int, default=8192 if gpu else 1024, help="the long job's budget")
    parser.add_argument("--hol-short-budget", type=int, default=32)
    parser.add_argument("--hol-shorts", type=int, default=4)
    parser.add_argument("--hol-delay", type=float, default=0.5, help="seconds between the long job and the short ones")
    parser.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True, help="vLLM LLM.generate")
    # Engine settings: the worker's defaults (tasks/settings.py).
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=int, default=20)
    parser.add_argument("--max-batch-tokens", type=int, default=65536)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    # Small models: a modest share leaves room for the next engine while the last one's memory is released.
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4 if gpu else 0.1)
    parser.add_argument("--cpu-kv-gib", type=float, default=1.0, help="vLLM's KV cache on CPU")
    parser.add_argument(
        "--eager", action=argparse.BooleanOptionalAction, default=not gpu, help="vLLM enforce_eager (CPU: on)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    header()
    models = list(MODEL_NAMES) if args.model == "both" else [args.model]
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    jobs = mixed_jobs(args.jobs, args.seed, args.max_budget)
    hol = head_of_line_jobs(args.hol_budget, args.hol_short_budget, args.hol_shorts)
    console.print(f"workload: {describe(jobs)}")
    runs: list[BackendRun] = []
    offline: dict[str, Offline] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="engine-compare-") as tmp:
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tmp) / "vllm-cache"))  # leave ~/.cache alone
        for name in models:
            model_dir = make_model(name, Path(tmp))
            console.print(f"[bold]{name}[/]: {parameter_count(model_dir) / 1e6:.2f}M parameters")
            for backend in backends:
                t = time.perf_counter()
                run, inputs = bench_backend(backend, name, model_dir, jobs, hol, args)
                runs.append(run)
                notes = "".join(f"; {n}" for n in sorted(set(run.notes)))
                console.print(f"  {backend}: done in {time.perf_counter() - t:.0f}s{notes}")
                if inputs is not None:
                    t = time.perf_counter()
                    offline[name] = bench_offline(inputs, len(warmup_jobs()), args.repeats)
                    console.print(f"  vllm LLM.generate: done in {time.perf_counter() - t:.0f}s")
    console.print()
    if args.mixed:
        console.print(mixed_table(runs, offline, args.repeats))
        for name, off in offline.items():
            ours = next(r.median for r in runs if r.model == name and r.backend == "vllm" and r.median)
            for where, label in (("main", "from the main thread"), ("thread", "from a fresh thread")):
                wall, cpu = off.median(where)
                console.print(
                    f"{name}: vllm backend through the engine API {ours.summary.wall_s:.2f}s vs LLM.generate {label} "
                    f"{wall:.2f}s -> ratio {ours.summary.wall_s / wall:.2f} (cpu {ours.cpu_s:.1f}s vs {cpu:.1f}s)"
                )
    if args.head_of_line:
        console.print(head_of_line_table(runs, args.hol_shorts, args.hol_delay))
    load = f", load average now {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    console.print(f"total {time.perf_counter() - started:.0f}s (engine start-ups included){load}")


if __name__ == "__main__":  # vLLM may start processes that import this module
    sys.exit(main())
