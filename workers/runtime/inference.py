"""The `varco.infer` task: one job from message to stored result, status and callbacks.

Runs in a task thread of the worker process: fetch and decode the image here (threads overlap
their I/O) and preprocess it, hand it to the engine, wait for this job's own output, parse, store, report. Every
failure ends the job with a typed error; nothing here may take the worker down.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery, Task
from celery.exceptions import Retry
from celery.signals import task_revoked
from pydantic import ValidationError

from varco.tasks.celery_app import INFER_TASK
from varco.tasks.errors import InferenceError, JobError, ResultStoreError, error_info
from varco.tasks.job_ids import is_valid_job_id
from varco.tasks.messages import InferMessage
from varco.tasks.requests import InvalidRequest, JobRequest
from varco.tasks.results_store import ResultStore
from varco.tasks.schemas import ErrorInfo, ImageInfo, JobResult, JobState, Timings, Usage
from varco.tasks.settings import Settings
from varco.tasks.status import StatusStore, now_iso, record_to_status
from varco.tasks.tags import parse
from varco.workers import metrics
from varco.workers.engines.base import Cancelled, EngineBackend, GenerationRequest
from varco.workers.input.fetch import FetchedImage, ImageFetcher
from varco.workers.logs import job_context
from varco.workers.net.retry import backoff_s
from varco.workers.output.result_cache import ResultCache
from varco.workers.output.result_writer import write_result
from varco.workers.output.webhooks import event_payload, send_event
from varco.workers.runtime.cancels import CancelWatcher
from varco.workers.runtime.fair_pick import FairPicker, ticket_of  # fair share (issue 19)
from varco.workers.runtime.leases import LeaseKeeper
from varco.workers.runtime.undecodable import on_undecodable

log = logging.getLogger(__name__)
# Set on a job's status record once its terminal webhook was queued (or was not wanted).
TERMINAL_WEBHOOK_FIELD = "terminal_webhook"
_TERMINAL_EVENTS = ("job.succeeded", "job.failed")


@dataclass
class Runtime:
    """What a worker process holds for its whole life: loaded once, shared by all task threads."""

    settings: Settings
    hostname: str
    engine: EngineBackend
    fetcher: ImageFetcher
    store: ResultStore
    statuses: StatusStore
    cancels: CancelWatcher
    app: Celery
    leases: LeaseKeeper
    cache: ResultCache  # the result cache index (VARCO_RESULT_CACHE_TTL), one per process
    fair: FairPicker  # fair share (issue 19): tickets -> jobs


def _parse_time(value: str | None) -> float | None:
    try:
        return datetime.fromisoformat(value).timestamp() if value else None
    except ValueError:
        return None


class _Job:
    def __init__(self, rt: Runtime, job_id: str, request: JobRequest, enqueued_at: str | None) -> None:
        self.rt, self.job_id, self.request = rt, job_id, request
        self.enqueued_at = enqueued_at or now_iso()

    def notify(
        self, event: str, state: JobState, result_uri: str | None = None, error: ErrorInfo | None = None
    ) -> None:
        url, wanted = self.request.callback_url, self.request.callback_events
        if url and (wanted is None or event in wanted):
            payload = event_payload(
                event, self.job_id, self.request, state, now_iso(), result_uri=result_uri, error=error
            )
            send_event(self.rt.app, url, payload)
        if event in _TERMINAL_EVENTS:  # queued (or not wanted): a later delivery need not send it again
            self.rt.statuses.redis.hset(self.rt.statuses.key(self.job_id), TERMINAL_WEBHOOK_FIELD, "1")

    def end(self, state: JobState, **fields: Any) -> bool:
        """This run's terminal transition; a record Redis lost meanwhile is made anew, so it still ends."""
        return self.rt.statuses.transition(self.job_id, state, recreate_task=self.request.task.value, **fields)

    def fail(self, error: ErrorInfo) -> None:
        log.info("job %s failed: %s: %s", self.job_id, error.type, error.message)
        if self.end(JobState.FAILED, error=error):
            metrics.observe_job(self.request.task.value, JobState.FAILED.value)
            self.notify("job.failed", JobState.FAILED, error=error)

    def run(self) -> None:
        rt, request = self.rt, self.request
        started = time.time()
        t0 = time.perf_counter()
        fetched = rt.fetcher.fetch(request.image_uri)
        fetch_s = time.perf_counter() - t0
        cache = rt.cache
        if (source := cache.lookup(request, fetched.sha256)) is not None:  # a repeat: no engine
            own = self.own_fields(fetched, started, fetch_s, 0.0) | {"usage": Usage(), "cached_from": source.job_id}
            self.finish(JobResult.model_validate(source.model_dump() | own), fetched, fetch_s, 0.0)
            return
        generation = GenerationRequest(
            image=fetched.image,
            prompt=request.model_prompt,
            max_new_tokens=request.max_new_tokens or rt.settings.max_new_tokens,
            image_id=fetched.sha256,
        )
        t1 = time.perf_counter()
        try:
            prepared = rt.engine.prepare(generation)  # here, in the task thread: the device's thread only generates
            future = rt.engine.submit(prepared, is_cancelled=lambda: rt.cancels.is_cancelled(self.job_id))
            output = future.result()
        except Cancelled:
            raise
        except Exception as exc:
            raise InferenceError(f"generation failed: {exc!r}") from exc
        inference_s = time.perf_counter() - t1
        parsed = parse(output.text, (fetched.width, fetched.height))
        if output.finish_reason == "length":
            parsed.warnings.append(f"output stopped at max_new_tokens={generation.max_new_tokens}; it may be cut")
        result = JobResult(
            task=request.task.value,
            state=JobState.SUCCEEDED,
            model=rt.settings.model,
            prompt=generation.prompt,
            output=parsed,
            usage=Usage(prompt_tokens=output.prompt_tokens, output_tokens=output.output_tokens),
            region=request.region,
            label=request.label,
            **self.own_fields(fetched, started, fetch_s, inference_s),
        )
        if (uri := self.finish(result, fetched, fetch_s, inference_s)) is not None:
            metrics.TOKENS.labels(kind="prompt").inc(output.prompt_tokens)
            metrics.TOKENS.labels(kind="output").inc(output.output_tokens)
            cache.remember(request, fetched.sha256, self.job_id, uri)

    def own_fields(self, fetched: FetchedImage, started: float, fetch_s: float, inference_s: float) -> dict[str, Any]:
        """The result fields that belong to this job alone (a cached answer takes the rest from its source)."""
        queued_at = _parse_time(self.enqueued_at)
        return {
            "job_id": self.job_id,
            "image": ImageInfo(
                uri=_uri_for_result(self.request.image_uri),
                width=fetched.width,
                height=fetched.height,
                sha256=fetched.sha256,
            ),
            "timings": Timings(
                queued_s=round(max(0.0, started - queued_at), 4) if queued_at else 0.0,
                fetch_s=round(fetch_s, 4),
                inference_s=round(inference_s, 4),
                total_s=round(max(0.0, time.time() - queued_at), 4) if queued_at else 0.0,
            ),
            "worker": self.rt.hostname,
            "tenant": self.request.tenant,  # fair share (issue 19)
            "created_at": self.enqueued_at,
            "finished_at": now_iso(),
            "metadata": self.request.metadata,
        }

    def finish(self, result: JobResult, fetched: FetchedImage, fetch_s: float, inference_s: float) -> str | None:
        """Keep the image, store the result, mark the job succeeded; its URI, or None if it had already ended."""
        rt, queued_at = self.rt, _parse_time(self.enqueued_at)
        t2 = time.perf_counter()

        def write() -> str:
            if rt.settings.keep_images:  # for overlays: before the result, so a result names only what exists
                result.image.kept_uri = rt.store.write_image(self.job_id, fetched.data)
            return rt.store.write(self.job_id, result.model_dump_json().encode())

        uri = write_result(write, rt.settings.store_retry_s, job_id=self.job_id, ended=self.ended,
                           on_wait=self.store_waits)  # fmt: skip
        if uri is None:
            log.info("job %s ended while its result waited; nothing written", self.job_id)
            return None
        store_s = time.perf_counter() - t2
        if not self.end(JobState.SUCCEEDED, result_uri=uri):
            self.unwrite()
            return None
        self.notify("job.succeeded", JobState.SUCCEEDED, result_uri=uri)
        phases = {"fetch": fetch_s, "store": store_s}
        if result.cached_from is None:  # a cached answer ran no inference: nothing to observe
            phases["inference"] = inference_s
        if queued_at:
            phases |= {"queue": result.timings.queued_s, "total": time.time() - queued_at}
        metrics.observe_job(self.request.task.value, JobState.SUCCEEDED.value, phases)
        return uri

    def ended(self) -> bool:
        """Whether the record already says how this job ended (then this run must not write a result)."""
        status = self.rt.statuses.get(self.job_id)
        return status is not None and status.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    def store_waits(self, error: ResultStoreError) -> None:
        # Shown as retrying, not counted as an attempt: the result is kept and only its write is retried.
        self.rt.statuses.transition(self.job_id, JobState.RETRYING, error=error.info())

    def unwrite(self) -> None:
        """The record turned failed or cancelled while the result was written: remove it, so the stored
        result and the job's state never disagree (a result another run stored for a succeeded job stays)."""
        status = self.rt.statuses.get(self.job_id)
        if status is not None and status.state is JobState.SUCCEEDED:
            return
        log.warning("job %s ended %s while its result was written; removing it", self.job_id,
                    status.state.value if status else "unknown")  # fmt: skip
        try:
            self.rt.store.delete(self.job_id)
        except Exception:
            log.exception("job %s: could not remove its result", self.job_id)


def register_inference_task(app: Celery, get_runtime: Callable[[], Runtime]) -> Task:
    @app.task(name=INFER_TASK, bind=True, acks_late=True, max_retries=None)
    def infer(self: Task, *args: Any, **kwargs: Any) -> None:
        rt: Runtime = get_runtime()
        if (ticket := ticket_of(self.request.id, args, kwargs)) is not None:  # fair share (issue 19)
            if (taken := rt.fair.take(ticket)) is not None:  # fair share (issue 19)
                late = rt.fair.deadline_error(taken) if taken.late else None  # fair share (issue 19)
                _run_message(self, rt, taken.args, taken.kwargs, late)  # fair share (issue 19)
            rt.fair.release(ticket)  # fair share (issue 19): the run ended; a Retry raised above keeps its job
            return  # fair share (issue 19)
        _run_message(self, rt, args, kwargs)  # fair share (issue 19): the body below, moved into a function

    def _run_message(  # fair share (issue 19): infer's body as it was, plus `late`
        self: Task, rt: Runtime, args: tuple[Any, ...], kwargs: dict[str, Any], late: JobError | None = None
    ) -> None:
        message = InferMessage.from_task_args(args, kwargs)  # never raises: the message is not trusted yet
        if message.job_id is None:
            log.error("dropped a %s message (task id %.80r): %s", INFER_TASK, self.request.id, message.problem)
            return
        job_id, request = message.job_id, message.request
        # Watched before the record says started: a cancel from then on reaches this process on
        # varco:cancel, and one requested earlier is honoured by begin_attempt itself, so no extra read.
        rt.cancels.watch(job_id)
        try:
            with job_context(job_id=job_id, task=request.get("task") if isinstance(request, dict) else None):
                _deliver(self, rt, job_id, message, late)  # fair share (issue 19): late
        finally:
            rt.cancels.forget(job_id)
            rt.leases.release(job_id)

    def on_revoked(sender: Task | None = None, request: Any = None, **_: Any) -> None:
        # `celery control revoke` of a queued job: Celery drops its message when it arrives here; the
        # record must end too, or pollers would wait on a job that never runs.
        if getattr(sender, "name", None) != INFER_TASK or request is None or not is_valid_job_id(request.id):
            return
        if get_runtime().statuses.transition(request.id, JobState.CANCELLED):
            log.info("job %s cancelled by a Celery revoke", request.id)

    task_revoked.connect(on_revoked, weak=False)

    def fail_undecodable(headers: dict[str, Any], exc: Exception) -> None:
        task_id = headers.get("id")
        if headers.get("task") != INFER_TASK or not is_valid_job_id(task_id):
            return
        error = ErrorInfo(type="InvalidRequest", message=f"the job message cannot be decoded: {exc!s:.300}")
        if get_runtime().statuses.transition(task_id, JobState.FAILED, error=error):
            log.warning("job %s failed: its message cannot be decoded", task_id)

    on_undecodable(app, fail_undecodable)
    return infer


def _deliver(task: Task, rt: Runtime, job_id: str, message: InferMessage, late: JobError | None = None) -> None:
    """One delivery of a job: claim it (unless a live run holds it), run it, and record how it ended."""
    request = message.request
    if late is not None and _fail_unstarted(rt, job_id, message, late):  # fair share (issue 19)
        return  # fair share (issue 19): its deadline passed in the queue; it never reaches the engine
    token = f"{rt.hostname}/{uuid.uuid4().hex[:12]}"
    claim = rt.statuses.claim(job_id, rt.hostname, rt.settings.max_attempts, token, rt.leases.lease_s)
    if claim.state is None:
        # A live run elsewhere holds the job (this copy came back through the visibility timeout): neither
        # run nor counted, and not dropped either. It returns when the lease would have lapsed, and runs
        # then only if the holder has died.
        log.info("job %s is running under a live lease; this delivery waits %.1fs", job_id, claim.leased_s)
        raise task.retry(countdown=claim.leased_s + 1.0, max_retries=None)
    state, attempts = claim.state, claim.attempts
    if state is JobState.STARTED:
        rt.leases.hold(job_id, token, (getattr(task.request, "properties", None) or {}).get("delivery_tag"))
    else:
        log.info("job %s not run: it is %s (delivery %d)", job_id, state.value, attempts)
        if state in (JobState.SUCCEEDED, JobState.FAILED):
            _send_missing_terminal_webhook(rt, job_id, request)
        return
    try:  # everything the Client checks, before any fetch or inference
        job_request, enqueued_at = message.validate(rt.settings.max_data_uri_bytes)
    except InvalidRequest as exc:
        log.warning("job %s failed: invalid message: %s", job_id, exc)
        rt.statuses.transition(job_id, JobState.FAILED, error=ErrorInfo(type="InvalidRequest", message=str(exc)))
        return
    job = _Job(rt, job_id, job_request, enqueued_at)
    if attempts == 1:
        job.notify("job.started", JobState.STARTED)
    try:
        job.run()
    except Cancelled:
        if job.end(JobState.CANCELLED):
            metrics.observe_job(job_request.task.value, JobState.CANCELLED.value)
    except JobError as exc:
        if exc.transient and attempts < rt.settings.max_attempts:
            log.info("job %s: %s (attempt %d); retrying", job_id, exc, attempts)
            rt.statuses.transition(job_id, JobState.RETRYING, error=exc.info())
            metrics.observe_job(job_request.task.value, JobState.RETRYING.value)
            try:
                raise task.retry(countdown=backoff_s(attempts - 1), max_retries=None) from None
            except Retry:
                raise
            except Exception:  # the retry could not be queued: fail now rather than hang in retrying
                log.exception("job %s: could not schedule its retry", job_id)
        job.fail(exc.info())
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job_id)
        job.fail(error_info(exc))


def _fail_unstarted(rt: Runtime, job_id: str, message: InferMessage, error: JobError) -> bool:  # fair share (issue 19)
    """Fail a job that never started, with its terminal webhook; False if its message is invalid (the
    normal path then fails it as InvalidRequest)."""
    try:
        job_request, enqueued_at = message.validate(rt.settings.max_data_uri_bytes)
    except InvalidRequest:
        return False
    _Job(rt, job_id, job_request, enqueued_at).fail(error.info())
    return True


def _send_missing_terminal_webhook(rt: Runtime, job_id: str, request: Any) -> None:
    """A delivery of a job that has already ended sends its terminal webhook if no run queued it: the
    run that ended it died between its terminal transition and the webhook (kill -9), or the job was
    failed as poison by this delivery's claim. At least once; receivers deduplicate on `webhook-id`."""
    record = rt.statuses.record(job_id)
    if not record or record.get(TERMINAL_WEBHOOK_FIELD) == "1":
        return
    try:
        job_request = JobRequest.model_validate(request)
    except (ValidationError, RecursionError):
        return
    status = record_to_status(record)
    event = "job.succeeded" if status.state is JobState.SUCCEEDED else "job.failed"
    log.info("job %s: sending its %s webhook, which no run had queued", job_id, event)
    _Job(rt, job_id, job_request, None).notify(event, status.state, result_uri=status.result_uri, error=status.error)


def _uri_for_result(uri: str) -> str:
    """Results name their image; an inline data URI is named by its header only, not copied whole."""
    return uri.split(",", 1)[0] + ",…" if uri.startswith("data:") else uri
