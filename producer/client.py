"""The client a web backend imports: submit jobs, poll or wait for them, read results, cancel.

It talks to Redis (the Celery broker and the status records) and reads results from the store;
it never imports torch or `workers/`: tasks are sent by name. When Redis cannot be reached, every call
raises `BrokerUnavailable` within bounded time (VARCO_REDIS_TIMEOUT_S, a few retries), never a raw
redis or kombu exception.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from varco.producer.batches import Batches
from varco.tasks import tracing
from varco.tasks.batches import BatchRecord, BatchStore
from varco.tasks.celery_app import DEFAULT_PRIORITY, create_app, infer_queue
from varco.tasks.connections import BrokerUnavailable, broker_errors, redis_client
from varco.tasks.delta_stream import START, Delta, DeltaStream, StreamEnd
from varco.tasks.fair_queue import FairQueue, QueuedJob, job_body, send_ticket
from varco.tasks.job_ids import is_valid_job_id
from varco.tasks.requests import (
    IdempotencyKeyReused,
    InvalidRequest,
    JobRequest,
    check_data_uri_size,
    validate_request,
)
from varco.tasks.results_store import ResultStore, result_store
from varco.tasks.schemas import ErrorInfo, JobResult, JobState, JobStatus
from varco.tasks.settings import Settings, get_settings
from varco.tasks.status import EventFeed, StatusStore, now_iso
from varco.tasks.tenants import DEFAULT_TENANT, check_tenant
from varco.tasks.waiting import FinishLine, Listen, Read, TimedOut, WaitPlan


class JobNotFound(KeyError):
    """No status record for this job id (never submitted, or expired after VARCO_STATUS_TTL)."""


class JobFailed(RuntimeError):
    """`result()` of a job that ended `failed`; `.error` holds its type and message."""

    def __init__(self, job_id: str, error: ErrorInfo | None) -> None:
        self.job_id, self.error = job_id, error
        detail = f"{error.type}: {error.message}" if error else "no error recorded"
        super().__init__(f"job {job_id} failed: {detail}")


class JobCancelled(RuntimeError):
    """`result()` of a job that was cancelled."""


class StreamNotRequested(LookupError):
    """`stream()` of a job that was not submitted with `stream=True`: it publishes no text as it runs."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} was not submitted with stream=True: read its result instead")


STREAM_POLL_MS = 1000  # with no new text for this long, the job's record is read: did it end elsewhere?


def _submit_span(task: str | None, tenant: str | None, count: int = 1) -> contextlib.AbstractContextManager[Any]:
    """The submit's span (a child of the caller's current span): its context is carried in each job's body
    and on its ticket's headers (messaging semantic conventions; Celery carries the tickets)."""
    attributes = {"messaging.system": "celery", "messaging.operation.type": "send", "messaging.batch.message_count":
                  count if count > 1 else None, "varco.task": task, "varco.tenant": tenant}  # fmt: skip
    return tracing.span("varco.submit", attributes, kind="producer")


class Client:
    def __init__(self, settings: Settings | None = None, *, tenant: str | None = None) -> None:
        """`tenant`: whom this client's jobs belong to unless a submit names another (default `default`)."""
        self.settings = settings or get_settings()
        self.tenant = check_tenant(tenant or DEFAULT_TENANT)
        self.redis = redis_client(self.settings)
        self.statuses = StatusStore(self.redis, self.settings.status_ttl)
        self.fair = FairQueue(self.redis)
        self.deltas = DeltaStream(self.redis, self.settings.status_ttl)
        self.app = create_app(self.settings)
        # No-op without an OTLP endpoint or a host application's own tracing (tasks/tracing.py).
        tracing.configure("varco-producer", join_host=True)
        self._store: ResultStore | None = None
        self._batches: Batches | None = None

    @property
    def store(self) -> ResultStore:
        if self._store is None:
            self._store = result_store(self.settings)
        return self._store

    # --- submitting -----------------------------------------------------------------------
    def validate(self, image_uri: str, task: str, **fields: Any) -> JobRequest:
        """Everything submit checks before enqueueing; raises InvalidRequest (a ValueError)."""
        request = validate_request(image_uri=image_uri, task=task, **{k: v for k, v in fields.items() if v is not None})
        check_data_uri_size(request.image_uri, self.settings.max_data_uri_bytes)  # the worker checks it too
        return request

    def submit(
        self,
        image_uri: str,
        task: str,
        *,
        prompt: str | None = None,
        region: Sequence[float] | None = None,
        label: str | None = None,
        callback_url: str | None = None,
        callback_events: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        priority: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        max_new_tokens: int | None = None,
        owner: str | None = None,
        tenant: str | None = None,
        deadline_s: float | None = None,
        stream: bool = False,
        constrained: bool | None = None,
    ) -> str:
        """Validate and enqueue one job; returns its id. Same idempotency key -> same id, one run.
        InvalidRequest for a bad request, QueueFull over a queued-jobs limit, BrokerUnavailable when Redis
        cannot be reached.

        `owner` is an opaque id of who submitted it (the HTTP gateway passes its API key's id), kept in
        the job's status record as `owner`; it is not part of the job request the worker sees. `tenant`
        (default: the client's) shares the GPUs fairly with other tenants; `deadline_s` (default
        VARCO_DEFAULT_DEADLINE_S) fails the job with DeadlineExceeded if it has not started that long after.
        `stream=True` has the worker publish the answer's text as the model writes it (`Client.stream`)."""
        request = self.validate(
            image_uri, task, prompt=prompt, region=region, label=label, callback_url=callback_url,
            callback_events=callback_events, idempotency_key=idempotency_key, priority=priority,
            metadata=metadata, max_new_tokens=max_new_tokens, tenant=tenant or self.tenant, deadline_s=deadline_s,
            stream=stream or None,
            constrained=constrained,
        )  # fmt: skip
        with broker_errors(self.settings), _submit_span(request.task.value, request.tenant) as span:
            job_id = self._enqueue([request], owner)[0]
            span.set_attribute("varco.job_id", job_id)
            return job_id

    def submit_many(self, requests: Iterable[Mapping[str, Any]], *, owner: str | None = None) -> list[str]:
        """Validate every request first (nothing is enqueued if one is bad), then enqueue them in order."""
        validated = []
        for index, fields in enumerate(requests):
            fields = dict(fields)
            fields["tenant"] = fields.get("tenant") or self.tenant
            try:
                validated.append(self.validate(fields.pop("image_uri", None), fields.pop("task", None), **fields))
            except InvalidRequest as exc:
                message = f"request #{index}: {exc}"
                raise InvalidRequest(message, index=index, reason=exc.reason, field=exc.field) from None
        try:
            one = validated[0] if len(validated) == 1 else None
            with broker_errors(self.settings), _submit_span(one and one.task.value, one and one.tenant,
                                                            len(validated)) as span:  # fmt: skip
                self._check_idempotency_keys(validated)  # a reused key refuses the batch up front
                job_ids = self._enqueue(validated, owner)
                if one is not None:
                    span.set_attribute("varco.job_id", job_ids[0])
                return job_ids
        except BrokerUnavailable as exc:
            message = f"{exc} ({len(exc.enqueued)} of {len(validated)} enqueued)"
            raise BrokerUnavailable(message, exc.enqueued) from exc

    def _enqueue(self, requests: Sequence[JobRequest], owner: str | None = None) -> list[str]:
        """Enqueue jobs in order, all admitted or none (QueueFull): a status record each, the jobs into the
        fair queue in one step, then one anonymous ticket each on their Celery queue (docs/tenants.md)."""
        job_ids: list[str] = []
        new: list[tuple[str, JobRequest]] = []
        for request in requests:
            job_id = uuid.uuid4().hex
            if request.idempotency_key:
                first = self.statuses.claim_idempotency_key(request.idempotency_key, job_id, request.fingerprint())
                if first != job_id:
                    job_ids.append(first)
                    continue
            job_ids.append(job_id)
            new.append((job_id, request))
        done = [j for j in job_ids if j not in {job_id for job_id, _ in new}]  # idempotent repeats
        try:
            with broker_errors(self.settings):
                for job_id, request in new:
                    self.statuses.create(job_id, request.task.value, owner=owner, tenant=request.tenant)
                    if request.stream:  # before any worker can take it: its first text has somewhere to go
                        self.deltas.open(job_id)
                self.fair.insert(
                    [self._queued(job_id, request) for job_id, request in new],
                    max_per_tenant=self.settings.max_queued_per_tenant,
                    max_queued=self.settings.max_queued,
                )
        except BrokerUnavailable as exc:
            self._forget(new, revoke=True)
            raise BrokerUnavailable(str(exc), done) from exc
        except Exception:
            self._forget(new, revoke=False)
            raise
        for sent, (job_id, request) in enumerate(new):
            queue = infer_queue(request.task, self.settings.task_routes)
            try:
                with broker_errors(self.settings):
                    send_ticket(self.app, queue, job_id)  # priority orders jobs within their tenant, in the fair queue
            except Exception as exc:
                # Not enqueued: leave no job behind that would wait forever (if Redis still answers).
                unsent = new[sent:]
                self._forget(unsent, revoke=True)
                if isinstance(exc, BrokerUnavailable):
                    lost = {j for j, _ in unsent}
                    raise BrokerUnavailable(str(exc), [j for j in job_ids if j not in lost]) from exc
                raise
        return job_ids

    def _check_idempotency_keys(self, requests: list[JobRequest]) -> None:
        """IdempotencyKeyReused, naming the request, when one reuses a key bound to a different request."""
        keyed = [(i, r) for i, r in enumerate(requests) if r.idempotency_key]
        conflicts = self.statuses.idempotency_conflicts([(r.idempotency_key or "", r.fingerprint()) for _, r in keyed])
        for (index, _), first in zip(keyed, conflicts, strict=True):
            if first is not None:
                raise IdempotencyKeyReused(first, index=index)

    def _queued(self, job_id: str, request: JobRequest) -> QueuedJob:
        trace = tracing.inject()  # the submit span: the job's own spans continue the caller's trace
        body = job_body(job_id, request.message_fields(), now_iso(), trace)
        deadline_s = request.deadline_s or self.settings.default_deadline_s
        queue = infer_queue(request.task, self.settings.task_routes)
        priority = DEFAULT_PRIORITY if request.priority is None else request.priority
        return QueuedJob(job_id, queue, request.tenant, priority, body, deadline_s)

    def _forget(self, jobs: Sequence[tuple[str, JobRequest]], *, revoke: bool) -> None:
        with contextlib.suppress(redis.RedisError):
            for job_id, request in jobs:
                if revoke and not self.fair.revoke(job_id):
                    continue  # a worker has it already: it runs
                self.statuses.delete(job_id)
                if request.idempotency_key:
                    self.statuses.release_idempotency_key(request.idempotency_key, job_id)

    # --- batches (OpenAI's Batch API; docs/gateway.md#batch-api) -----------------------------
    @property
    def batches(self) -> Batches:
        if self._batches is None:
            self._batches = Batches(self.settings, BatchStore(self.redis, self.settings.status_ttl))
        return self._batches

    def submit_batch(
        self, path_or_uri: str | Path, *, completion_window: str = "24h", metadata: Mapping[str, str] | None = None,
        owner: str | None = None, tenant: str | None = None,
    ) -> str:  # fmt: skip
        """Store a JSONL file of `/v1/chat/completions` requests (a local path, or an `s3://` URI read in
        place) and start a batch on it; returns the batch id. A `varco worker` node's runner validates and
        runs it. InvalidRequest for a bad file or window (limits: VARCO_BATCH_MAX_FILE_BYTES, _MAX_LINES)."""
        with broker_errors(self.settings):
            source = str(path_or_uri)
            record = (self.batches.reference(source, owner or "") if source.startswith("s3://")
                      else self.batches.upload_path(source, owner or ""))  # fmt: skip
            return self.batches.create(record.id, completion_window=completion_window, metadata=metadata,
                                       owner=owner or "", tenant=tenant or self.tenant).id  # fmt: skip

    def batch(self, batch_id: str) -> BatchRecord:
        """The batch's record (`.openai()` is OpenAI's Batch object); BatchNotFound if there is none."""
        with broker_errors(self.settings):
            return self.batches.get(batch_id)

    def cancel_batch(self, batch_id: str) -> BatchRecord:
        with broker_errors(self.settings):
            return self.batches.cancel(batch_id)

    def batch_results(self, batch_id: str) -> Iterator[bytes]:
        """The finished batch's output lines, then its error lines, as chunks of JSONL."""
        return self.batches.results(self.batch(batch_id))

    def wait_batch(self, batch_id: str, timeout: float | None = None, poll_s: float = 1.0) -> BatchRecord:
        """Poll until the batch has finished; TimeoutError past `timeout`."""
        give_up = None if timeout is None else time.monotonic() + timeout
        while not (record := self.batch(batch_id)).status.finished:
            if give_up is not None and time.monotonic() >= give_up:
                raise TimeoutError(f"batch {batch_id} is still {record.status.value} after {timeout}s")
            time.sleep(poll_s)
        return record

    # --- reading --------------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        with broker_errors(self.settings):
            status = self.statuses.get(job_id) if is_valid_job_id(job_id) else None  # no job has a malformed id
        if status is None:
            raise JobNotFound(job_id)
        return status

    def wait(self, job_ids: str | Iterable[str], timeout: float | None = None) -> Iterator[JobStatus]:
        """Yield each job's final status as it finishes (in finishing order); TimeoutError past `timeout`."""
        with broker_errors(self.settings):
            yield from self._wait(job_ids, timeout)

    def _wait(self, job_ids: str | Iterable[str], timeout: float | None) -> Iterator[JobStatus]:
        # The decisions are tasks/waiting.py's; this loop only does the Redis calls they ask for.
        line = FinishLine([job_ids] if isinstance(job_ids, str) else job_ids)
        if malformed := sorted(j for j in line.pending if not is_valid_job_id(j)):
            raise JobNotFound(malformed[0])
        plan = WaitPlan(time.monotonic(), timeout)
        feed: EventFeed | None = self.statuses.events()  # before reading records, so no finish slips between
        try:
            while line.pending:
                statuses: dict[str, JobStatus | None] = {}
                event = None
                try:
                    if feed is None:
                        feed = self.statuses.events()
                    match plan.next_step(time.monotonic()):
                        case Read():
                            statuses = self.statuses.get_many(sorted(line.pending))
                        case Listen(seconds):
                            event = feed.next(seconds)
                            if feed.resubscribed():  # redis-py reconnected it: events may have been lost
                                plan.missed_events(time.monotonic())
                        case TimedOut():
                            raise TimeoutError(f"{len(line.pending)} job(s) not finished after {timeout}s")
                    plan.answered()
                except (redis.ConnectionError, redis.TimeoutError):
                    if not plan.outage(time.monotonic()):
                        raise
                    if feed is not None:
                        feed.close()
                    feed = None
                    time.sleep(plan.poll_interval_s)
                    continue
                for job_id, status in statuses.items():
                    if status is None:
                        raise JobNotFound(job_id)
                    if (final := line.offer(status)) is not None:
                        yield final
                if (final := line.offer(event)) is not None:
                    yield final
        finally:
            if feed is not None:
                feed.close()

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for the job (up to `timeout`), then read its result JSON from the store."""
        return self.stored_result(next(self.wait(job_id, timeout=timeout)))

    def stored_result(self, status: JobStatus) -> JobResult:
        """The result of a job whose final status the caller holds, read from the store without asking Redis
        again (the gateway has just watched the job end); JobFailed or JobCancelled as `result()` raises them."""
        if status.state is JobState.FAILED:
            raise JobFailed(status.job_id, status.error)
        if status.state is JobState.CANCELLED:
            raise JobCancelled(f"job {status.job_id} was cancelled")
        uri = status.result_uri or self.store.uri_for(status.job_id)
        return JobResult.model_validate_json(self.store.read(uri))

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[str]:
        """Yield the answer's text as the model writes it (tags kept; the pieces joined are the result's
        `output.raw`), from its start whenever it is called, and end when the job ends: JobFailed or
        JobCancelled as `result()` raises them, StreamNotRequested for a job submitted without
        `stream=True`, JobNotFound, TimeoutError past `timeout`."""
        with broker_errors(self.settings):
            yield from self._stream(job_id, timeout)

    def _stream(self, job_id: str, timeout: float | None) -> Iterator[str]:
        status = self.status(job_id)
        if not self.deltas.is_open(job_id):
            raise StreamNotRequested(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        after, ended = START, None
        while ended is None:
            entries = self.deltas.read(job_id, after, block_ms=STREAM_POLL_MS)
            if not entries:  # quiet: the job may have ended without its run writing the end (cancelled queued)
                if status.state.finished or (status := self.status(job_id)).state.finished:
                    entries = self.deltas.read(job_id, after) or [StreamEnd(after, status.state.value)]
                elif deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} not finished after {timeout}s")
            for entry in entries:
                after = entry.id
                if isinstance(entry, Delta):
                    yield entry.text
                else:
                    ended = entry
        if ended.state == JobState.FAILED:
            raise JobFailed(job_id, self.status(job_id).error)
        if ended.state == JobState.CANCELLED:
            raise JobCancelled(f"job {job_id} was cancelled")

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued, retrying or running job. False when it had already finished."""
        with broker_errors(self.settings):
            state = self.statuses.request_cancel(job_id) if is_valid_job_id(job_id) else None
        if state is None:
            raise JobNotFound(job_id)
        return state is JobState.CANCELLED or not state.finished

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
