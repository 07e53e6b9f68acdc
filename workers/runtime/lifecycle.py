"""The job lifecycle: one delivery of a `varco.infer` message, from its claim to the stored result, the
status and the webhooks.

Runs in a task thread of the worker process: fetch and decode the image here (threads overlap their I/O)
and preprocess it, hand it to the engine, wait for this job's own output, parse, store, report. Every
failure ends the job with a typed error; nothing here may take the worker down.

No Celery here (cog's runner never imports its transport either): the binding (`celery_task.py`) hands in
the message, a `retry(countdown)` callable and the delivery tag, and the webhook sender comes with the
`Runtime`, so the whole path is unit-tested with fakes (`tests/workers/runtime/test_lifecycle.py`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationError

from varco.tasks import tracing
from varco.tasks.delta_stream import DeltaStream
from varco.tasks.errors import InferenceError, JobError, error_info
from varco.tasks.messages import InferMessage
from varco.tasks.redaction import redact_uri
from varco.tasks.requests import InvalidRequest, JobRequest
from varco.tasks.results_store import ResultStore
from varco.tasks.schemas import ErrorInfo, ImageInfo, JobResult, JobState, Timings, Usage
from varco.tasks.settings import Settings
from varco.tasks.status import StatusStore, now_iso
from varco.tasks.tag_grammar import constraint_for
from varco.tasks.tags import parse
from varco.tasks.tenants import DEFAULT_TENANT
from varco.workers import metrics
from varco.workers.engines.base import Cancelled, EngineBackend, GenerationOutput, GenerationRequest
from varco.workers.input.fetch import FetchedImage, ImageFetcher
from varco.workers.logs import job_context
from varco.workers.net.retry import backoff_s
from varco.workers.output.result_cache import ResultCache
from varco.workers.output.result_writer import write_result
from varco.workers.output.webhooks import TERMINAL_EVENTS, event_payload, terminal_event
from varco.workers.runtime.delta_publisher import DeltaPublisher
from varco.workers.runtime.fair_pick import FairPicker

log = logging.getLogger(__name__)
_TERMINAL_EVENTS = tuple(TERMINAL_EVENTS.values())

# Schedules this message again in `countdown` seconds. Celery's binding raises its `Retry` out of it, which
# ends the delivery; it raises RetryNotQueued when the redelivery could not be queued.
RetryFn = Callable[[float], None]
# Queues one webhook (url, payload) for the callback process; never raises into the job.
SendWebhook = Callable[[str, dict[str, Any]], None]


class RetryNotQueued(Exception):
    """`retry` could not schedule the redelivery (the broker is away): the job fails now rather than hang
    in `retrying`."""


class Cancels(Protocol):
    """The process's cancelled-jobs set (`cancels.CancelWatcher`)."""

    def is_cancelled(self, job_id: str) -> bool: ...
    def watch(self, job_id: str) -> None: ...
    def forget(self, job_id: str) -> None: ...


class Leases(Protocol):
    """The process's lease keeper (`leases.LeaseKeeper`)."""

    lease_s: float

    def hold(self, job_id: str, token: str, delivery_tag: str | None) -> None: ...
    def release(self, job_id: str) -> None: ...


@dataclass
class Runtime:
    """What a worker process holds for its whole life: loaded once, shared by all task threads."""

    settings: Settings
    hostname: str
    engine: EngineBackend
    fetcher: ImageFetcher
    store: ResultStore
    statuses: StatusStore
    cancels: Cancels
    leases: Leases
    cache: ResultCache  # the result cache index (VARCO_RESULT_CACHE_TTL), one per process
    send_webhook: SendWebhook  # output/webhooks.send_event bound to the Celery app
    fair: FairPicker | None = None  # tickets -> jobs (fair share, docs/tenants.md); None: no tickets here
    deltas: DeltaStream | None = None  # streamed jobs' text as generated (tasks/delta_stream.py); None: not published


def deliver(
    rt: Runtime, job_id: str, message: InferMessage, retry: RetryFn, *, delivery_tag: str | None,
    late: JobError | None = None, trace: Mapping[str, str] | None = None, ticket_trace: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """One delivery of a job: claim it (unless a live run holds it), run it, and record how it ended.

    The job is watched for cancels before its record says started: a cancel from then on reaches this
    process on varco:cancel, and one requested earlier is honoured by the claim itself. The delivery is
    the `varco.job` span, a child of the submit's context `trace` (docs/tracing.md).
    """
    request = message.request
    fields = request if isinstance(request, dict) else {}
    task = fields.get("task") if isinstance(fields.get("task"), str) else None
    attributes = {
        "varco.job_id": job_id, "varco.task": task, "varco.tenant": fields.get("tenant") or DEFAULT_TENANT,
        "varco.worker": rt.hostname, "varco.engine": getattr(rt.engine, "name", None),
        "messaging.system": "celery", "messaging.operation.type": "process",
    }  # fmt: skip
    links = [ticket_trace] if ticket_trace and ticket_trace != trace else None
    rt.cancels.watch(job_id)
    try:
        with (
            tracing.span("varco.job", attributes, kind="consumer", parent=tracing.context_of(trace), links=links),
            job_context(job_id=job_id, task=task),
        ):
            if late is not None and _fail_unstarted(rt, job_id, message, late):
                return  # its deadline passed in the queue: it never reaches the engine
            _deliver(rt, job_id, message, retry, delivery_tag)
    finally:
        rt.cancels.forget(job_id)
        rt.leases.release(job_id)


def _deliver(rt: Runtime, job_id: str, message: InferMessage, retry: RetryFn, delivery_tag: str | None) -> None:
    token = f"{rt.hostname}/{uuid.uuid4().hex[:12]}"
    claim = rt.statuses.claim(job_id, rt.hostname, rt.settings.max_attempts, token, rt.leases.lease_s)
    if claim.state is None:
        # A live run elsewhere holds the job (this copy came back through the visibility timeout): neither
        # run nor counted, and not dropped either. It returns when the lease would have lapsed, and runs
        # then only if the holder has died.
        log.info("job %s is running under a live lease; this delivery waits %.1fs", job_id, claim.leased_s)
        retry(claim.leased_s + 1.0)
        return
    state, attempts = claim.state, claim.attempts
    tracing.event("varco.status", {"varco.state": state.value, "varco.attempt": attempts})
    if state is not JobState.STARTED:
        log.info("job %s not run: it is %s (delivery %d)", job_id, state.value, attempts)
        if state.finished:  # a job cancelled while queued ends here too: its job.cancelled goes out now
            send_missing_terminal_webhook(rt, job_id, message.request)
        return
    rt.leases.hold(job_id, token, delivery_tag)
    try:  # everything the Client checks, before any fetch or inference
        job_request, enqueued_at = message.validate(rt.settings.max_data_uri_bytes)
    except InvalidRequest as exc:
        log.warning("job %s failed: invalid message: %s", job_id, exc)
        rt.statuses.transition(job_id, JobState.FAILED, error=ErrorInfo(type="InvalidRequest", message=str(exc)))
        return
    job = _Job(rt, job_id, job_request, enqueued_at)
    if attempts == 1:
        tracing.record_span("varco.queue_wait", int(job.queued_at * 1e9))  # from enqueued_at to this claim
        job.notify("job.started", JobState.STARTED)
    try:
        job.run()
    except Cancelled:
        tracing.event("varco.cancel")
        if job.end(JobState.CANCELLED):
            metrics.observe_job(job_request.task.value, JobState.CANCELLED.value)
            job.notify("job.cancelled", JobState.CANCELLED)
        else:
            job.report_cancel()
    except JobError as exc:
        if exc.transient and attempts < rt.settings.max_attempts:
            log.info("job %s: %s (attempt %d); retrying", job_id, exc, attempts)
            rt.statuses.transition(job_id, JobState.RETRYING, error=exc.info())
            tracing.event("varco.status", {"varco.state": JobState.RETRYING.value, "error.type": exc.info().type})
            metrics.observe_job(job_request.task.value, JobState.RETRYING.value)
            try:
                retry(backoff_s(attempts - 1))
                return
            except RetryNotQueued:
                log.exception("job %s: could not schedule its retry", job_id)
        job.fail(exc.info())
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job_id)
        job.fail(error_info(exc))


def send_missing_terminal_webhook(rt: Runtime, job_id: str, request: Any) -> None:
    """A delivery of a job that has already ended sends its terminal webhook if no run queued it: the
    run that ended it died between its terminal transition and the webhook (kill -9), or the job was
    failed as poison by this delivery's claim. At least once; receivers deduplicate on `webhook-id`."""
    if rt.statuses.terminal_webhook_sent(job_id):
        return
    status = rt.statuses.get(job_id)
    if status is None:
        return
    try:
        job_request = JobRequest.model_validate(request)
    except (ValidationError, RecursionError):
        return
    event = terminal_event(status.state)
    if event is None:
        return
    log.info("job %s: sending its %s webhook, which no run had queued", job_id, event)
    _Job(rt, job_id, job_request, None).notify(event, status.state, result_uri=status.result_uri, error=status.error)


def _uri_for_result(uri: str) -> str:
    """Results name their image; an inline data URI is named by its header only, not copied whole."""
    return uri.partition(",")[0] + ",…" if uri.startswith("data:") else uri


class _Job:
    def __init__(self, rt: Runtime, job_id: str, request: JobRequest, enqueued_at: str | None) -> None:
        self.rt, self.job_id, self.request = rt, job_id, request
        self.enqueued_at = enqueued_at or now_iso()  # checked ISO 8601 (`InferMessage.validate`)
        self.queued_at = datetime.fromisoformat(self.enqueued_at).timestamp()
        self.output: GenerationOutput | None = None  # what the engine answered, once it has
        self.publisher = DeltaPublisher(rt.deltas, job_id) if request.stream and rt.deltas is not None else None

    def notify(
        self, event: str, state: JobState, result_uri: str | None = None, error: ErrorInfo | None = None
    ) -> None:
        url, wanted = self.request.callback_url, self.request.callback_events
        if not url or (wanted is not None and event not in wanted):
            return  # nothing to send, now or by a later delivery: nothing to mark (4 Redis commands saved)
        payload = event_payload(event, self.job_id, self.request, state, now_iso(), result_uri=result_uri, error=error)
        self.rt.send_webhook(url, payload)
        if event in _TERMINAL_EVENTS:  # queued: a later delivery need not send it again
            self.rt.statuses.mark_terminal_webhook(self.job_id)

    def end(self, state: JobState, **fields: Any) -> bool:
        """This run's terminal transition; a record Redis lost meanwhile is made anew, so it still ends.
        A streamed job's stream ends with it (readers of a job ended elsewhere stop on its status)."""
        ended = self.rt.statuses.transition(self.job_id, state, recreate_task=self.request.task.value, **fields)
        tracing.event("varco.status", {"varco.state": state.value, "varco.transitioned": ended})
        if ended and self.publisher is not None:
            self.publisher.end(state.value, self.output)
        return ended

    def fail(self, error: ErrorInfo) -> None:
        log.info("job %s failed: %s: %s", self.job_id, error.type, error.message)
        tracing.fail_current(error.type, error.message)  # the job's span: an error, for the trace viewer
        if self.end(JobState.FAILED, error=error):
            metrics.observe_job(self.request.task.value, JobState.FAILED.value)
            self.notify("job.failed", JobState.FAILED, error=error)
        else:
            self.report_cancel()

    def report_cancel(self) -> None:
        """The job ended under this run: a cancel while it waited to retry its write, or while it failed.
        No later delivery comes for it, so its job.cancelled goes out from here, once."""
        status = self.rt.statuses.get(self.job_id)
        cancelled = status is not None and status.state is JobState.CANCELLED
        if cancelled and not self.rt.statuses.terminal_webhook_sent(self.job_id):
            self.notify("job.cancelled", JobState.CANCELLED)

    def run(self) -> None:
        rt, request = self.rt, self.request
        started = time.time()
        t0 = time.perf_counter()
        with tracing.span("varco.fetch", {"url.full": redact_uri(request.image_uri)}) as span:
            fetched = rt.fetcher.fetch(request.image_uri)
            span.set_attributes({"varco.image.bytes": len(fetched.data), "varco.image.sha256": fetched.sha256})
        fetch_s = time.perf_counter() - t0
        cache = rt.cache
        if (source := cache.lookup(request, fetched.sha256)) is not None:  # a repeat: no engine
            with tracing.span("varco.result_cache.hit", {"varco.cached_from": source.job_id}):
                own = self.own_fields(fetched, started, fetch_s, 0.0) | {"usage": Usage(), "cached_from": source.job_id}
                if self.publisher is not None:  # the whole answer at once: there is nothing to generate
                    self.publisher.publish(source.output.raw)
                self.finish(JobResult.model_validate(source.model_dump() | own), fetched, fetch_s, None)
            return
        generation = GenerationRequest(
            image=fetched.image,
            prompt=request.model_prompt,
            max_new_tokens=request.max_new_tokens or rt.settings.max_new_tokens,
            image_id=fetched.sha256,
            constraint=constraint_for(request.task, request.constrained, rt.settings.constrained_tags),
        )
        t1 = time.perf_counter()
        try:
            with tracing.span("varco.prepare"):
                prepared = rt.engine.prepare(generation)  # here, in the task thread: the device's thread only generates
            # The engine makes this job's varco.engine_wait and varco.generate spans in its own thread.
            streamed = {"on_delta": self.publisher.put} if self.publisher is not None else {}  # others pay nothing
            future = rt.engine.submit(prepared, is_cancelled=lambda: rt.cancels.is_cancelled(self.job_id), **streamed)
            if self.publisher is not None:
                self.publisher.pump(future)
            output = self.output = future.result()
        except Cancelled:
            raise
        except Exception as exc:
            raise InferenceError(f"generation failed: {exc!r}") from exc
        inference_s = time.perf_counter() - t1
        with tracing.span("varco.parse") as span:
            parsed = parse(output.text, (fetched.width, fetched.height))
            span.set_attribute("varco.parse.warnings", len(parsed.warnings))
        if output.finish_reason == "length":
            parsed.warnings.append(f"output stopped at max_new_tokens={generation.max_new_tokens}; it may be cut")
        result = JobResult(
            task=request.task.value,
            state=JobState.SUCCEEDED,
            model=rt.settings.model,
            prompt=generation.prompt,
            output=parsed,
            usage=Usage(prompt_tokens=output.prompt_tokens, output_tokens=output.output_tokens),
            finish_reason=output.finish_reason,
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
        return {
            "job_id": self.job_id,
            "image": ImageInfo(
                uri=_uri_for_result(self.request.image_uri),
                width=fetched.width,
                height=fetched.height,
                sha256=fetched.sha256,
            ),
            "timings": Timings(
                queued_s=round(max(0.0, started - self.queued_at), 4),
                fetch_s=round(fetch_s, 4),
                inference_s=round(inference_s, 4),
                total_s=round(max(0.0, time.time() - self.queued_at), 4),
            ),
            "worker": self.rt.hostname,
            "tenant": self.request.tenant,  # fair share (issue 19)
            "created_at": self.enqueued_at,
            "finished_at": now_iso(),
            "metadata": self.request.metadata,
        }

    def finish(self, result: JobResult, fetched: FetchedImage, fetch_s: float, inference_s: float | None) -> str | None:
        """Keep the image, store the result, mark the job succeeded; its URI, or None if it had already ended.
        `inference_s` is None for an answer from the result cache, which ran no inference."""
        rt = self.rt
        t2 = time.perf_counter()

        def write() -> str:
            if rt.settings.keep_images:  # for overlays: before the result, so a result names only what exists
                result.image.kept_uri = rt.store.write_image(self.job_id, fetched.data)
            return rt.store.write(self.job_id, result.model_dump_json().encode())

        with tracing.span("varco.result_write"):  # the store's retries are its events (result_writer.py)
            uri = write_result(write, rt.settings.store_retry_s, job_id=self.job_id, statuses=rt.statuses)
        if uri is None:
            log.info("job %s ended while its result waited; nothing written", self.job_id)
            self.report_cancel()
            return None
        store_s = time.perf_counter() - t2
        if not self.end(JobState.SUCCEEDED, result_uri=uri):
            self.unwrite()
            self.report_cancel()
            return None
        self.notify("job.succeeded", JobState.SUCCEEDED, result_uri=uri)
        phases = {"fetch": fetch_s, "store": store_s}
        if inference_s is not None:
            phases["inference"] = inference_s
        phases |= {"queue": result.timings.queued_s, "total": time.time() - self.queued_at}
        metrics.observe_job(self.request.task.value, JobState.SUCCEEDED.value, phases)
        return uri

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


def _fail_unstarted(rt: Runtime, job_id: str, message: InferMessage, error: JobError) -> bool:
    """Fail a job that never started (its deadline passed in the queue), with its terminal webhook; False if
    its message is invalid (the normal path then fails it as InvalidRequest)."""
    try:
        job_request, enqueued_at = message.validate(rt.settings.max_data_uri_bytes)
    except InvalidRequest:
        return False
    _Job(rt, job_id, job_request, enqueued_at).fail(error.info())
    return True
