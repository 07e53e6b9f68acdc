"""The mixed workload the engine benchmarks share, and how they drive an engine with it.

Jobs are drawn with a seeded RNG: a task type, a token budget in that task's range (captions short,
grounding and OCR long, a few near 512), and an image of one of several sizes, from thumbnails to
800x600 and a tall and a wide one. Every job is scripted to generate exactly its budget, so both
backends do the same work whatever the random weights would say.
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from varco.tasks.prompts import TaskType, build_prompt
from varco.workers.devtools.scripted import ScriptBook
from varco.workers.engines.base import EngineBackend, GenerationOutput, GenerationRequest

# Task -> (weight in the mix, smallest budget, largest budget).
TASK_MIX: dict[TaskType, tuple[float, int, int]] = {
    TaskType.CAPTION: (0.35, 8, 64),
    TaskType.VQA: (0.15, 8, 96),
    TaskType.REFERRING: (0.15, 16, 128),
    TaskType.GROUNDING: (0.2, 128, 512),
    TaskType.OCR: (0.15, 64, 512),
}
# (width, height): thumbnails to 800x600, plus a tall and a wide one (they tile differently under anyres).
IMAGE_SIZES = [(64, 48), (320, 240), (640, 480), (800, 600), (240, 800), (800, 240)]
NEAR_MAX_SHARE = 0.25  # of the long tasks' budgets are drawn from their top 10%, so a few sit near 512


@dataclass(frozen=True)
class Job:
    index: int
    task: TaskType
    budget: int
    request: GenerationRequest


@dataclass(frozen=True)
class JobResult:
    job: Job
    output: GenerationOutput
    latency_s: float  # from the moment all jobs were handed to the task threads to this job's result


def random_image(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str]:
    """Noise (no two images alike, so no backend gets an image or prefix cache hit) and its content hash."""
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels), hashlib.sha256(pixels.tobytes()).hexdigest()


def prompt_for(task: TaskType, rng: np.random.Generator) -> str:
    if task is TaskType.REFERRING:
        x, y = rng.uniform(0, 0.5, 2).round(3)
        return build_prompt(task, region=(float(x), float(y), float(x) + 0.4, float(y) + 0.4), label="the object")
    if task is TaskType.VQA:
        return build_prompt(task, prompt="What colours stand out in this picture?")
    return build_prompt(task)


def make_job(index: int, task: TaskType, budget: int, size: tuple[int, int], rng: np.random.Generator) -> Job:
    image, image_id = random_image(rng, *size)
    request = GenerationRequest(image, prompt_for(task, rng), budget, image_id)
    return Job(index, task, budget, request)


def mixed_jobs(count: int, seed: int = 0, max_budget: int = 512) -> list[Job]:
    rng = np.random.default_rng(seed)
    tasks = list(TASK_MIX)
    weights = np.array([TASK_MIX[t][0] for t in tasks])
    jobs = []
    for index in range(count):
        task = tasks[rng.choice(len(tasks), p=weights / weights.sum())]
        _, low, high = TASK_MIX[task]
        high = min(high, max_budget)
        low = min(low, high)
        if high >= 256 and rng.random() < NEAR_MAX_SHARE:
            low = int(high * 0.9)
        budget = int(rng.integers(low, high + 1))
        size = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
        jobs.append(make_job(index, task, budget, size, rng))
    return jobs


def head_of_line_jobs(long_budget: int, short_budget: int = 32, shorts: int = 4, seed: int = 1) -> list[Job]:
    """One long grounding job first, then `shorts` short captions right behind it."""
    rng = np.random.default_rng(seed)
    jobs = [make_job(0, TaskType.GROUNDING, long_budget, (640, 480), rng)]
    jobs += [make_job(i + 1, TaskType.CAPTION, short_budget, (640, 480), rng) for i in range(shorts)]
    return jobs


def warmup_jobs(count: int = 2, seed: int = 99) -> list[Job]:
    rng = np.random.default_rng(seed)
    return [make_job(i, TaskType.CAPTION, 8, IMAGE_SIZES[i % len(IMAGE_SIZES)], rng) for i in range(count)]


def script(book: ScriptBook, jobs: Sequence[Job]) -> None:
    """Force each job to generate exactly its budget: one byte-level token per "a", never an early EOS."""
    for job in jobs:
        request = job.request
        book.scripts[f"{request.image_id}:{request.prompt}"] = "a" * job.budget


def reset_caches(engine: Any) -> None:
    """Forget cached prefixes and image features (vLLM's), so running the same jobs again is no cache hit.

    Takes a VLLMEngine or an `LLM`; a no-op for the hf engine, which caches nothing across requests.
    """
    inner = getattr(engine, "engine", None) or getattr(engine, "llm_engine", None)
    for method in ("reset_prefix_cache", "reset_mm_cache", "reset_encoder_cache"):
        if callable(reset := getattr(inner, method, None)):
            reset()


def run_jobs(engine: EngineBackend, jobs: Sequence[Job], threads: int | None = None) -> tuple[list[JobResult], float]:
    """Hand every job to a task thread at once (prepare, submit, wait: what a worker's threads do).

    Returns the results in job order and the wall time from the hand-over to the last result.
    """
    started = time.perf_counter()
    lock = threading.Lock()
    done: dict[int, JobResult] = {}

    def one(job: Job) -> None:
        output = engine.submit(engine.prepare(job.request)).result()
        now = time.perf_counter() - started
        with lock:
            done[job.index] = JobResult(job, output, now)

    with ThreadPoolExecutor(max_workers=threads or len(jobs), thread_name_prefix="task") as pool:
        for future in [pool.submit(one, job) for job in jobs]:
            future.result()  # raises a job's failure here
    wall = time.perf_counter() - started
    return [done[job.index] for job in jobs], wall


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


@dataclass(frozen=True)
class Summary:
    jobs: int
    wall_s: float
    output_tokens: int
    prompt_tokens: int
    p50_s: float
    p95_s: float
    exact: bool  # every job generated exactly its budget

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def summarise(results: Sequence[JobResult], wall: float) -> Summary:
    latencies = [r.latency_s for r in results]
    return Summary(
        jobs=len(results),
        wall_s=wall,
        output_tokens=sum(r.output.output_tokens for r in results),
        prompt_tokens=sum(r.output.prompt_tokens for r in results),
        p50_s=statistics.median(latencies),
        p95_s=percentile(latencies, 95),
        exact=all(r.output.output_tokens == r.job.budget for r in results),
    )


def describe(jobs: Sequence[Job]) -> str:
    """One line: how many jobs of each task, and the budgets."""
    counts = {t: sum(j.task is t for j in jobs) for t in TASK_MIX}
    budgets = [j.budget for j in jobs]
    mix = ", ".join(f"{t.value} {n}" for t, n in counts.items() if n)
    return (
        f"{len(jobs)} jobs ({mix}); budgets {min(budgets)}-{max(budgets)}, "
        f"mean {statistics.mean(budgets):.0f}, total {sum(budgets)} tokens"
    )
