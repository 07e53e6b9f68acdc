"""The /v1 API: submit, batch, status, result (with wait), cancel, events (SSE), overlay.

Each handler is a thin layer over `Client`: the same validation (InvalidRequest messages become 422
problems), the same status records and results. Blocking Client calls run in the threadpool;
waiting uses redis.asyncio pub/sub (sse.watch), so a waiting request holds no thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from varco.gateway import overlay
from varco.gateway.access import JobId, caller, job_caller, not_found, owned_status, tenant_of
from varco.gateway.open_streams import HeldStream
from varco.gateway.problems import Problem, responses
from varco.gateway.public_view import public_result, public_status
from varco.gateway.sse import Cursor, event_stream, interrupted_frame, watch
from varco.gateway.state import GatewayState, gateway
from varco.producer.client import Client, JobCancelled, JobFailed, JobNotFound
from varco.tasks import tracing
from varco.tasks.requests import IdempotencyKeyReused, InvalidRequest, JobRequest
from varco.tasks.schemas import JobResult, JobState, JobStatus

MAX_WAIT_S = 60.0
T = TypeVar("T")
MAX_IDEMPOTENCY_KEY_CHARS = 128  # namespaced by key id below, within JobRequest's 200

router = APIRouter(prefix="/v1", tags=["jobs"], responses=responses(401, 422, 429, 503))
Caller = Annotated[str, Depends(caller)]
JobCaller = Annotated[str, Depends(job_caller)]
State = Annotated[GatewayState, Depends(gateway)]


class Submitted(BaseModel):
    job_id: str
    status_url: str


class BatchSubmitted(BaseModel):
    job_ids: list[str]
    status_urls: list[str]


def status_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def _request_body(schema: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


async def _json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except ValueError as exc:
        raise Problem(422, "invalid-json", f"request body is not JSON: {exc}") from None
    except RecursionError:  # json's C parser recurses once per "[" or "{"; the interpreter's limit ends it
        raise Problem(422, "invalid-json", "request body is nested too deeply to parse") from None


def _job_fields(item: Any, who: str, idempotency_key: str | None, index: int | None = None) -> dict[str, Any]:
    """A submitted object as Client keyword arguments; the same messages InvalidRequest gives."""
    where = f"request #{index}: " if index is not None else ""
    if not isinstance(item, dict):
        raise Problem(422, "invalid-request", f"{where}invalid job request: expected a JSON object", index=index)
    if unknown := sorted(set(item) - set(JobRequest.model_fields) | ({"tenant"} & set(item))):  # the key's tenant
        raise Problem(
            422, "invalid-request", f"{where}invalid job request: {unknown[0]}: Extra inputs are not permitted",
            field=unknown[0], index=index,
        )  # fmt: skip
    fields = dict(item)
    key = idempotency_key if idempotency_key is not None else fields.get("idempotency_key")
    if key is not None:
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise Problem(
                422, "invalid-request", f"{where}idempotency key must be 1..{MAX_IDEMPOTENCY_KEY_CHARS} characters",
                field="idempotency_key", index=index,
            )  # fmt: skip
        fields["idempotency_key"] = f"{who}:{key}"  # one key's Idempotency-Key never names another key's job
    return fields


def _batch_fields(body: Any, who: str, limit: int) -> list[dict[str, Any]]:
    """A batch body as one Client keyword dict per job; the first bad job refuses the whole batch."""
    jobs = body.get("jobs") if isinstance(body, dict) else None
    if not isinstance(jobs, list) or not jobs or set(body) != {"jobs"}:
        raise Problem(422, "invalid-request", 'body must be {"jobs": [job, ...]} with at least one job', field="jobs")
    if len(jobs) > limit:
        raise Problem(
            422, "invalid-request", f"{len(jobs)} jobs in one batch; the limit is {limit} (VARCO_GATEWAY_MAX_BATCH)",
            field="jobs",
        )  # fmt: skip
    return [_job_fields(item, who, None, index) for index, item in enumerate(jobs)]


def _invalid_in_batch(exc: InvalidRequest) -> Problem:
    """A batch's InvalidRequest: its message names the job ("request #2: ..."), and `index` says it too."""
    return Problem(422, "invalid-request", str(exc), field=exc.field, index=exc.index)


@router.post(
    "/jobs", status_code=202, response_model=Submitted, openapi_extra=_request_body("JobRequest"),
    responses=responses(408, 413), summary="Submit a job",
)  # fmt: skip
async def submit_job(
    request: Request, response: Response, state: State, who: Caller,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", max_length=MAX_IDEMPOTENCY_KEY_CHARS)
    ] = None,
) -> Submitted:  # fmt: skip
    """Body: submit's fields. The same Idempotency-Key (per API key) returns the first job's id."""
    fields = _job_fields(await _json(request), who, idempotency_key) | {"tenant": tenant_of(state, who)}
    try:
        [job_id] = await run_in_threadpool(state.client.submit_many, [fields], owner=who)
    except IdempotencyKeyReused as exc:
        raise Problem(422, "idempotency-key-reused", exc.reason, field=exc.field) from None
    except InvalidRequest as exc:  # a one-job batch: the message without "request #0"
        raise Problem(422, "invalid-request", exc.reason, field=exc.field) from None
    state.metrics.submitted.inc()
    response.headers["Location"] = status_url(job_id)
    return Submitted(job_id=job_id, status_url=status_url(job_id))


@router.post(
    "/jobs/batch", status_code=202, response_model=BatchSubmitted, openapi_extra=_request_body("JobBatch"),
    responses=responses(408, 413), summary="Submit several jobs, all validated before any is enqueued",
)  # fmt: skip
async def submit_batch(request: Request, state: State, who: Caller) -> BatchSubmitted:
    tenant = tenant_of(state, who)
    fields = [
        job | {"tenant": tenant}
        for job in _batch_fields(await _json(request), who, state.client.settings.gateway_max_batch)
    ]
    try:
        job_ids = await run_in_threadpool(state.client.submit_many, fields, owner=who)
    except IdempotencyKeyReused as exc:
        raise Problem(422, "idempotency-key-reused", str(exc), field=exc.field, index=exc.index) from None
    except InvalidRequest as exc:
        raise _invalid_in_batch(exc) from None
    state.metrics.submitted.inc(len(job_ids))
    return BatchSubmitted(job_ids=job_ids, status_urls=[status_url(j) for j in job_ids])


@router.get("/jobs/{job_id}", response_model=JobStatus, responses=responses(404), summary="A job's status")
async def get_job(job_id: JobId, state: State, who: JobCaller) -> JobStatus:
    return public_status(await owned_status(state, job_id, who))


def _finished_or_409(status: JobStatus) -> None:
    if status.state is JobState.FAILED:
        raise Problem(409, "job-failed", f"job {status.job_id} failed", state=status.state.value,
                      error=status.error.model_dump() if status.error else None)  # fmt: skip
    if status.state is JobState.CANCELLED:
        raise Problem(409, "job-cancelled", f"job {status.job_id} was cancelled", state=status.state.value)
    if not status.state.finished:
        raise Problem(409, "job-not-finished", f"job {status.job_id} is {status.state.value}", state=status.state.value)


@router.get(
    "/jobs/{job_id}/result", response_model=JobResult, responses=responses(404, 409, 503),
    summary="A job's result; waits up to `wait` seconds for a running job",
)  # fmt: skip
async def get_result(
    job_id: JobId, state: State, who: JobCaller,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for the job to finish")] = 0,
) -> JobResult:  # fmt: skip
    status = await owned_status(state, job_id, who)
    if not status.state.finished and wait > 0:
        with tracing.span("varco.result_wait", {"varco.job_id": job_id, "varco.wait_s": wait}):
            async for update in watch(state.statuses, job_id, timeout=wait):
                status = update or status
    _finished_or_409(status)
    try:
        return public_result(await run_in_threadpool(state.client.stored_result, status))
    except JobNotFound:
        raise not_found(job_id) from None
    except Exception as exc:  # the store is down or the object is gone: say so, never a bare 500
        raise Problem(503, "result-unavailable", f"result could not be read: {type(exc).__name__}: {exc}") from None


@router.delete(
    "/jobs/{job_id}", response_model=JobStatus, responses=responses(404, 409),
    summary="Cancel a queued, retrying or running job",
)  # fmt: skip
async def cancel_job(job_id: JobId, state: State, who: Caller) -> JobStatus:
    status = await owned_status(state, job_id, who)
    if status.state.finished or not await run_in_threadpool(state.client.cancel, job_id):
        final = await owned_status(state, job_id, who)
        raise Problem(409, "job-finished", f"job {job_id} already finished ({final.state.value})",
                      state=final.state.value)  # fmt: skip
    return public_status(await owned_status(state, job_id, who))  # cancelled, or running with the cancel on its way


@router.get(
    "/jobs/{job_id}/events", response_class=StreamingResponse, summary="Server-Sent Events: each status change",
    responses={200: {"description": "`retry: 5000`, then `event: status` frames (JSON status in `data`) until "
                                    "the job is finished, then `event: end`; a job submitted with "
                                    "`stream: true` has `event: delta` frames too (`{\"text\": ...}`: the "
                                    "answer as the model writes it). A stream cut short (the gateway shuts "
                                    "down, Redis is lost) ends with `event: interrupted` instead: reconnect "
                                    "with `Last-Event-ID`",
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}},
               204: {"description": "`Last-Event-ID` names the job's final status: the stream had ended "
                                    "(EventSource stops reconnecting)"},
               **responses(404)},
)  # fmt: skip
async def job_events(
    job_id: JobId, state: State, who: JobCaller,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", max_length=200, description="resume after this event (EventSource sends it)"),
    ] = None,
) -> Response:  # fmt: skip
    status = await owned_status(state, job_id, who)
    cursor = Cursor.parse(last_event_id)
    if status.state.finished and cursor.has_seen(status):
        return Response(status_code=204)  # a reconnect after `end`
    release = state.streams.reserve(who)  # 429 too-many-streams
    events = event_stream(state.statuses, job_id, state.deltas, cursor=cursor,
                          outage_grace_s=state.client.settings.gateway_stream_outage_s)  # fmt: skip
    return HeldStream(
        state.streams.guarded(events, interrupted_frame),
        release,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},  # nginx: do not buffer the stream
    )


async def _read_kept(state: GatewayState, job_id: str, who: str, read: Callable[[Client, str], T], kind: str) -> T:
    """`read` (the kept image, or the overlay drawn on it) for the caller's finished job; its errors as 409s,
    `kind` when no image was kept."""
    _finished_or_409(await owned_status(state, job_id, who))
    try:
        return await run_in_threadpool(read, state.client, job_id)
    except JobNotFound:
        raise not_found(job_id) from None
    except (JobFailed, JobCancelled) as exc:
        raise Problem(409, "job-failed", str(exc)) from None
    except overlay.OverlayUnavailable as exc:
        raise Problem(409, kind, str(exc)) from None


@router.get(
    "/jobs/{job_id}/image", response_class=Response, summary="The image bytes the worker fetched for the job",
    responses={200: {"description": "the image as fetched (`image.kept_uri` of the result names this route)",
                     "content": {"image/*": {}}}, **responses(404, 409)},
)  # fmt: skip
async def job_image(job_id: JobId, state: State, who: JobCaller) -> Response:
    _, data, media_type = await _read_kept(state, job_id, who, overlay.kept_image, "image-unavailable")
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/jobs/{job_id}/overlay.png", response_class=Response, summary="The image with its parsed result drawn on it",
    responses={200: {"description": "PNG at the image's own size", "content": {"image/png": {}}},
               **responses(404, 409)},
)  # fmt: skip
async def job_overlay(job_id: JobId, state: State, who: JobCaller) -> Response:
    png = await _read_kept(state, job_id, who, overlay.stored_overlay, "overlay-unavailable")
    if png is None:  # drawn by at most VARCO_GATEWAY_OVERLAY_RENDERS requests at once; the rest wait here
        async with state.overlay_renders:
            png = await _read_kept(state, job_id, who, overlay.overlay_png, "overlay-unavailable")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
