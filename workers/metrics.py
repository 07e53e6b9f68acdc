"""Prometheus metrics of a worker node, written by every child process and served once by the supervisor.

prometheus-client's multiprocess mode: the supervisor gives its children one `PROMETHEUS_MULTIPROC_DIR`,
each child's metrics land in files there, and the supervisor's `/metrics` adds them up, so a node is
one scrape target however many GPUs it has. Without that variable (tests, a process run alone) the
same metrics live in the process's own registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# The phases of a job, one after another: `sum by (task)` over them counts each second once. The time from
# submit to stored result overlaps them all, so it is a metric of its own (varco_job_total_seconds).
PHASES = ("queue", "fetch", "inference", "store")
_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

JOBS = Counter("varco_jobs", "Jobs that reached a state in this node, by task type", ["task", "state"])
JOB_SECONDS = Histogram(
    "varco_job_duration_seconds",
    "Seconds a job spent per phase (queue: submit to start, fetch, inference, store)",
    ["task", "phase"],
    buckets=_BUCKETS,
)
JOB_TOTAL_SECONDS = Histogram(
    "varco_job_total_seconds", "Seconds from submit to stored result of a succeeded job", ["task"], buckets=_BUCKETS
)
BATCH_SIZE = Histogram(
    "varco_batch_size",
    "Requests per generate call (hf) or sequences running per engine step (vllm)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
TOKENS = Counter("varco_tokens", "Tokens of finished jobs", ["kind"])  # kind: prompt | output
ENGINE_BUSY = Counter("varco_engine_busy_seconds", "Seconds the engine thread spent generating")
RESULT_CACHE = Counter("varco_result_cache_lookups", "Result cache lookups by outcome", ["outcome"])  # hit | miss
CALLBACKS = Counter("varco_callback_deliveries", "Webhook delivery attempts by outcome", ["outcome"])
# Tenant labels are bounded (tasks/tenants.metric_label): weighted tenants and `default` by name, the rest `other`.
EXPIRED = Counter("varco_jobs_expired", "Jobs whose deadline passed before they started (never run)", ["tenant"])
PICKS = Counter("varco_fair_picks", "Jobs this node took from the fair queue, by tenant", ["tenant"])
GPU_MEMORY = Gauge(
    "varco_gpu_memory_bytes", "GPU memory allocated by the engine process", ["gpu"], multiprocess_mode="liveall"
)


def observe_job(task: str, state: str, phases: dict[str, float] | None = None) -> None:
    """Count a job reaching `state`, with the seconds of its PHASES; a "total" among them (submit to stored
    result) goes to varco_job_total_seconds, never beside the phases it overlaps."""
    JOBS.labels(task=task, state=state).inc()
    for phase, seconds in (phases or {}).items():
        metric = JOB_TOTAL_SECONDS.labels(task=task) if phase == "total" else JOB_SECONDS.labels(task=task, phase=phase)
        metric.observe(max(0.0, seconds))
