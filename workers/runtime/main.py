"""One worker process: `python -m varco.workers.runtime.main --hostname gpu0@host [--queues varco]`.

Started by the supervisor with CUDA_VISIBLE_DEVICES already set, so torch sees exactly one GPU.
Loads the model before consuming the first message, starts the engine thread, then runs a Celery
worker with a thread pool: threads fetch and preprocess images concurrently and feed the engine. SIGTERM is a
Celery warm shutdown: in-flight jobs finish, then the process exits (without the interpreter's teardown,
`fast_exit.py`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
from pathlib import Path
from typing import Any

from celery import Celery
from pydantic import ValidationError

from varco.tasks import tracing
from varco.tasks.celery_app import INFER_QUEUE, create_app, prepare_broker
from varco.tasks.connections import WORKER_RETRIES, redis_client
from varco.tasks.delta_stream import DeltaStream
from varco.tasks.results_store import result_store
from varco.tasks.settings import Settings
from varco.tasks.status import StatusStore
from varco.workers import metrics
from varco.workers.logs import configure_logging
from varco.workers.node import exit_codes
from varco.workers.node.health import NODE_STATE_ENV
from varco.workers.runtime.fast_exit import exit_without_teardown
from varco.workers.runtime.heartbeat import Heartbeat, engine_state

log = logging.getLogger("varco.worker")


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def run_inference_worker(hostname: str, queues: list[str], concurrency: int | None = None) -> None:
    configure_logging(hostname)
    tracing.configure("varco-worker")  # OTEL_* variables; no endpoint, no tracing (docs/tracing.md)
    try:
        quiet_transformers()
        from varco.workers.engines import create_engine
        from varco.workers.input.fetch import ImageFetcher
        from varco.workers.output.result_cache import ResultCache
        from varco.workers.output.webhooks import send_event
        from varco.workers.runtime.cancels import CancelWatcher
        from varco.workers.runtime.celery_task import register_inference_task
        from varco.workers.runtime.fair_pick import FairPicker, TicketRefill
        from varco.workers.runtime.leases import LeaseKeeper
        from varco.workers.runtime.lifecycle import Runtime
    except ImportError as exc:
        log.error("%s cannot start: %s. Install the worker extra: pip install 'varco-queue[worker]'", hostname, exc)
        raise SystemExit(exit_codes.CANNOT_START) from None
    holder: dict[str, Any] = {"engine": None}  # what the heartbeat reports: None until the model is loaded
    if state_dir := os.environ.get(NODE_STATE_ENV):
        Heartbeat(Path(state_dir), hostname, lambda: _child_state(holder["engine"])).start()
    try:
        settings = Settings()
        engine = create_engine(settings)
    except (ValidationError, ValueError, ImportError) as exc:
        log.error("%s cannot start: %s", hostname, exc)
        raise SystemExit(exit_codes.CANNOT_START) from None
    try:
        engine.load()  # before any message is taken
    except Exception:
        log.exception("%s could not load the model %s", hostname, settings.model)
        raise SystemExit(exit_codes.LOAD_FAILED) from None
    holder["engine"] = engine
    log.info(
        "%s: model %s loaded by the %s engine on %s in %.2fs; CUDA_VISIBLE_DEVICES=%r",
        hostname, settings.model, engine.name, engine.device, engine.load_seconds,
        os.environ.get("CUDA_VISIBLE_DEVICES"),
    )  # fmt: skip
    client = redis_client(settings, retries=WORKER_RETRIES)
    app = create_app(settings)
    statuses = StatusStore(client, settings.status_ttl)
    store = result_store(settings)
    runtime = Runtime(
        settings=settings,
        hostname=hostname,
        engine=engine,
        fetcher=ImageFetcher(settings),
        store=store,
        statuses=statuses,
        cancels=CancelWatcher(client).start(),
        leases=LeaseKeeper(client, statuses, app, settings.visibility_timeout).start(),
        cache=ResultCache(client, store, settings),
        send_webhook=functools.partial(send_event, app),
        fair=FairPicker(client, statuses, settings.tenant_weights),
        deltas=DeltaStream(client, settings.status_ttl),
    )
    register_inference_task(app, lambda: runtime)
    prepare_broker(app)
    refill = TicketRefill(app, client, queues, min(60.0, settings.visibility_timeout / 6)).start()
    # Enough task threads to keep the engine full while others fetch: a batch and the next one for hf,
    # every sequence slot and a few spare for vllm.
    threads = concurrency or (
        settings.max_num_seqs + 4 if engine.name == "vllm" else max(4, 2 * settings.max_batch_size)
    )
    try:
        _run_celery(app, hostname, queues, threads)
    finally:
        runtime.engine.stop()
        runtime.cancels.stop()
        runtime.leases.stop()
        refill.stop()
        runtime.fetcher.close()


def _child_state(engine: Any | None) -> dict[str, Any]:
    """The heartbeat's content; also refreshes the GPU memory gauge (device-wide, so vLLM's engine
    processes count too)."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        metrics.GPU_MEMORY.labels(gpu=os.environ.get("CUDA_VISIBLE_DEVICES") or "0").set(total - free)
    return engine_state(engine)


def run_callback_worker(hostname: str, concurrency: int = 8) -> None:
    configure_logging(hostname)
    tracing.configure("varco-callbacks")
    from varco.tasks.celery_app import CALLBACK_BATCH_QUEUE, CALLBACK_QUEUE
    from varco.workers.output.webhook_delivery import DeliveredLog, register_callback_task

    settings = Settings()
    app = create_app(settings)
    prepare_broker(app)
    delivered = DeliveredLog(redis_client(settings, retries=WORKER_RETRIES), settings.status_ttl)
    register_callback_task(app, settings, delivered)
    # The Batch API's runner lives here too: every node runs one, a batch is leased to one at a time.
    runner = _batch_runner(settings)
    try:
        _run_celery(app, hostname, [CALLBACK_QUEUE, CALLBACK_BATCH_QUEUE], concurrency)
    finally:
        if runner is not None:
            runner.stop()


def _batch_runner(settings: Settings) -> Any:
    try:
        from varco.producer import Client
        from varco.producer.batch_runner import BatchRunner

        return BatchRunner(Client(settings)).start()
    except ImportError as exc:  # the openai package (the worker extra pins it) maps batch lines
        log.warning("the batch runner is off on this node: %s", exc)
        return None


def _run_celery(app: Celery, hostname: str, queues: list[str], concurrency: int) -> None:
    worker = app.Worker(
        hostname=hostname,
        pool="threads",
        concurrency=concurrency,
        queues=queues,
        loglevel="INFO",
        without_gossip=True,
        without_mingle=True,
        # Worker heartbeat events (one PUBLISH per 2 s per process) keep the event dispatcher up when task events
        # are off, so a remote enable_events (Flower does it every 5 s) turns them on; Flower shows the worker too.
        without_heartbeat=False,
        optimization="fair",
        quiet=True,  # no banner on stdout: every line of the log is a record (JSON when asked)
    )
    worker.start()
    raise SystemExit(worker.exitcode or 0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m varco.workers.runtime.main")
    parser.add_argument("--hostname", default=f"cpu0@{socket.gethostname()}")
    parser.add_argument("--queues", default=INFER_QUEUE, help="comma-separated inference queues")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--callbacks", action="store_true", help="run the webhook delivery worker instead")
    args = parser.parse_args()
    try:
        if args.callbacks:
            run_callback_worker(args.hostname, args.concurrency or 8)
        else:
            run_inference_worker(args.hostname, args.queues.split(","), args.concurrency)
    except SystemExit as exc:  # the usual way out: Celery's worker has stopped, or the child cannot start
        code: object = exc.code
    else:
        code = 0
    # The orderly shutdown is over (run_*_worker's `finally` has stopped the engine and the runtime's
    # threads): skip torch's and vLLM's interpreter teardown, seconds that every node stop waits for.
    # An unexpected exception is not caught above and takes the normal way out, with its traceback.
    exit_without_teardown(code)


if __name__ == "__main__":
    main()
