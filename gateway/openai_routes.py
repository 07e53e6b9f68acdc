"""OpenAI-compatible routes over the /v1/jobs machinery: `GET /v1/models` and `POST /v1/chat/completions`.

A chat completion is a job like any other (same Client, owner, status record, result, auth and rate
limit; `varco.job_id` names it on /v1/jobs), submitted and then waited for on the job's status events,
or, with `stream: true`, relayed from its delta stream as chunks while the model writes (openai_stream.py).
A caller that hangs up before the answer cancels its job, so no GPU time goes to answers nobody reads.
Errors come in OpenAI's shape (openai_errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from openai.types import CompletionUsage, Model
from openai.types.chat import ChatCompletion
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from varco.gateway.access import caller, tenant_of
from varco.gateway.job_deltas import follow
from varco.gateway.open_streams import SHUTDOWN, HeldStream, stop_future
from varco.gateway.openai_errors import OpenAIError, OpenAIRoute, bad_request, error_responses, model_not_found
from varco.gateway.openai_mapping import (
    ChatJob,
    ChatRequestError,
    UnknownModel,
    completion_usage,
    model_objects,
    served_models,
    to_chat_completion,
    to_job,
)
from varco.gateway.openai_stream import ChunkStream
from varco.gateway.problems import QUEUE_FULL_RETRY_AFTER_S
from varco.gateway.sse import watch
from varco.gateway.state import GatewayState, gateway
from varco.producer.client import Client, JobNotFound
from varco.tasks.delta_stream import StreamEnd
from varco.tasks.fair_queue import QueueFull
from varco.tasks.requests import InvalidRequest
from varco.tasks.schemas import JobResult, JobState, JobStatus

log = logging.getLogger(__name__)
# Failures of the image the caller sent: a 400 for them, like OpenAI's for an image it cannot read.
IMAGE_ERRORS = ("ImageFetchError", "ForbiddenURLError", "ImageTooLargeError", "ImageDecodeError")
STARTED_AT = int(time.time())  # `created` of the served model: when this gateway started serving it

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute,
                   responses=error_responses(400, 401, 429, 500, 503))  # fmt: skip
Caller = Annotated[str, Depends(caller)]
State = Annotated[GatewayState, Depends(gateway)]


class ModelList(BaseModel):
    object: str = "list"
    data: list[Model]


def _models(state: GatewayState) -> list[Model]:
    return model_objects(state.client.settings.model, STARTED_AT)


@router.get("/models", response_model=ModelList, summary="The served model, by its name and a short alias")
async def list_models(state: State, _: Caller) -> ModelList:
    return ModelList(data=_models(state))


@router.get("/models/{model:path}", response_model=Model, responses=error_responses(404), summary="One served model")
async def retrieve_model(model: str, state: State, _: Caller) -> Model:
    for served in _models(state):
        if served.id == model:
            return served
    raise model_not_found(model)


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}", None, "invalid_json") from None
    except RecursionError:  # json's C parser recurses once per "[" or "{"
        raise bad_request("the JSON body is nested too deeply to parse", None, "invalid_json") from None


def _job(body: Any, state: GatewayState) -> ChatJob:
    served = served_models(state.client.settings.model)
    try:
        return to_job(body, served)
    except UnknownModel as exc:
        raise model_not_found(exc.model) from None
    except ChatRequestError as exc:
        raise bad_request(exc.message, exc.param, exc.code) from None


async def _finished(state: GatewayState, job_id: str) -> JobStatus | None:
    """The job's status once it is finished; None if its record disappeared first."""
    async for status in watch(state.statuses, job_id):
        if status is not None and status.state.finished:
            return status
    return None


HUNG_UP, SHUTTING_DOWN = "hung up", "shutting down"
T = TypeVar("T")


async def _unless_hung_up(request: Request, waiting: Awaitable[T]) -> T | str:
    """What `waiting` returns, or HUNG_UP if the caller disconnects first, or SHUTTING_DOWN if the gateway
    begins to (`waiting` is then stopped)."""
    answer = asyncio.ensure_future(waiting)
    hung_up = asyncio.ensure_future(_hung_up(request))
    closing = asyncio.ensure_future(gateway(request).streams.closing.wait())
    try:
        await asyncio.wait({answer, hung_up, closing}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled
        answer.cancel()
        hung_up.cancel()
        closing.cancel()
        raise
    await stop_future(hung_up)
    await stop_future(closing)
    if answer.done():
        return answer.result()
    await stop_future(answer)
    return HUNG_UP if hung_up.done() and not hung_up.cancelled() else SHUTTING_DOWN


async def _hung_up(request: Request) -> None:
    """Returns when the caller disconnects (the body is read: the next receive waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _refusal(status: JobStatus | None, job: ChatJob, job_id: str) -> OpenAIError | None:
    """The error for a job that ended without an answer (None for one that succeeded)."""
    if status is None:
        return OpenAIError(500, f"job {job_id}'s status record expired before it finished", code="job_lost")
    if status.state is JobState.FAILED:
        return _failed(status, job)
    if status.state is JobState.CANCELLED:
        return OpenAIError(409, f"job {job_id} was cancelled (DELETE /v1/jobs/{job_id})", code="job_cancelled")
    return None


async def _cancel_for_hang_up(state: GatewayState, job_id: str, why: str) -> JSONResponse:
    """The job of a caller who left, or of one the gateway leaves as it shuts down, is cancelled: its answer
    would reach nobody (an SDK retries a 503 as a new request)."""
    log.info("chat completion %s: %s before the answer; cancelling its job", job_id, why)
    with contextlib.suppress(JobNotFound):
        await run_in_threadpool(state.client.cancel, job_id)
    if why == SHUTTING_DOWN:
        raise OpenAIError(503, f"the gateway is shutting down; job {job_id} was cancelled: send the request again",
                          code="gateway_shutdown", headers={"Retry-After": "1"})  # fmt: skip
    return JSONResponse({}, status_code=499)  # never sent: there is no one to send it to


async def _result(state: GatewayState, job_id: str, status: JobStatus | None = None) -> JobResult:
    """The job's result; with its final `status` in hand, straight from the store (no second wait on Redis)."""
    try:
        if status is not None:
            return await run_in_threadpool(state.client.stored_result, status)
        return await run_in_threadpool(state.client.result, job_id, 5.0)
    except Exception as exc:  # the store is down or the object is gone: say so, never a bare 500
        raise OpenAIError(503, f"result could not be read: {type(exc).__name__}: {exc}",
                          code="result_unavailable") from None  # fmt: skip


def _failed(status: JobStatus, job: ChatJob) -> OpenAIError:
    error = status.error
    message = f"job {status.job_id} failed: {error.type}: {error.message}" if error else f"job {status.job_id} failed"
    if error is not None and error.type in IMAGE_ERRORS:
        return bad_request(message, job.param_for("image_uri"), "invalid_image")
    if error is not None and error.type == "DeadlineExceeded":
        return OpenAIError(503, message, code="deadline_exceeded")
    return OpenAIError(500, message, code=error.type if error else "job_failed")


@router.post(
    "/chat/completions", summary="A chat completion: one image and its question, answered by one job",
    responses={200: {"model": ChatCompletion,
                     "description": "a `chat.completion` with a top-level `varco` object (job id, parsed output); "
                                    "with `stream: true`, `chat.completion.chunk` events as the model writes, "
                                    "then `data: [DONE]`",
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}},
               **error_responses(404, 409, 413)},
)  # fmt: skip
async def chat_completions(request: Request, state: State, who: Caller) -> Response:
    job = _job(await _body(request), state)
    # A stream's slot is taken before the job is submitted: over VARCO_GATEWAY_MAX_STREAMS_PER_KEY, 429 and
    # nothing enqueued. The response gives it back when it ends; an error or a plain answer, at once.
    release = state.streams.reserve(who) if job.request.stream else _nothing
    try:
        response = await _answer(request, state, who, job)
    except BaseException:
        release()
        raise
    if isinstance(response, HeldStream):
        response.release = release
    else:
        release()
    return response


def _nothing() -> None:
    return None


async def _answer(request: Request, state: GatewayState, who: str, job: ChatJob) -> Response:
    fields = job.request.model_dump(exclude_none=True) | {"tenant": tenant_of(state, who)}
    try:
        [job_id] = await run_in_threadpool(state.client.submit_many, [fields], owner=who)
    except InvalidRequest as exc:  # checks Client adds (the data URI's size)
        raise bad_request(exc.reason, job.param_for(exc.field)) from None
    except QueueFull as exc:  # admission control (docs/tenants.md): nothing was enqueued
        raise OpenAIError(429, str(exc), code="rate_limit_exceeded",
                          headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}) from None  # fmt: skip
    state.metrics.submitted.inc()

    if job.request.stream:
        return await _streamed(request, state, job, job_id)
    status = await _unless_hung_up(request, _finished(state, job_id))
    if isinstance(status, str):  # HUNG_UP: the caller left, its answer would reach nobody; or SHUTDOWN
        return await _cancel_for_hang_up(state, job_id, status)
    if (refusal := _refusal(status, job, job_id)) is not None:
        raise refusal
    completion = to_chat_completion(await _result(state, job_id, status))
    return JSONResponse(completion.model_dump(mode="json"), headers={"x-request-id": job_id})


async def _streamed(request: Request, state: GatewayState, job: ChatJob, job_id: str) -> Response:
    """Chunks as the model writes. Until the first piece of text (or the end) the answer is an ordinary
    HTTP response, so a job that fails before it (a bad image) is an HTTP error like a non-streamed one."""
    entries = follow(state.deltas, state.statuses, job_id)
    first = await _unless_hung_up(request, anext(entries))
    if isinstance(first, str):
        return await _cancel_for_hang_up(state, job_id, first)

    async def failed(end: StreamEnd) -> OpenAIError:
        status = await state.statuses.get(job_id)
        return _refusal(status, job, job_id) or OpenAIError(500, f"job {job_id} ended {end.state}", code="job_lost")

    if isinstance(first, StreamEnd) and first.state != JobState.SUCCEEDED:
        raise await failed(first)

    async def usage() -> tuple[str, CompletionUsage]:
        result = await _result(state, job_id)
        return result.finish_reason or "stop", completion_usage(result)

    chunks = ChunkStream(job_id, state.client.settings.model, int(time.time()), job.include_usage)

    def interrupted(reason: str, detail: str) -> bytes:
        """The stream cut short after its first chunk: an error event, which the SDK raises (no [DONE], as
        for a job that fails mid-stream). The job is cancelled (`_cancel_on_hang_up`): a chat completion
        cannot be resumed, and a retried request is a new job."""
        message = f"{detail}; job {job_id} was cancelled: send the request again"
        code = "gateway_shutdown" if reason == SHUTDOWN else "service_unavailable"
        return b"data: " + json.dumps(OpenAIError(503, message, code=code).body()).encode() + b"\n\n"

    return HeldStream(
        state.streams.guarded(
            _cancel_on_hang_up(state, job_id, chunks.events(first, entries, failed, usage)), interrupted
        ),
        _nothing,  # the handler sets the stream's release
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", "x-request-id": job_id},
    )


async def _cancel_on_hang_up(state: GatewayState, job_id: str, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`events`, and the job cancelled if the caller hangs up before the last of them (the server stops the
    response at its next await, or closes this generator at its next yield)."""
    finished = False
    try:
        async for event in events:
            yield event
        finished = True
    finally:
        if not finished:
            log.info("streamed chat completion %s ended early (hang-up, shutdown, Redis lost): cancelling its job",
                     job_id)  # fmt: skip
            # Not awaited: this runs while the response is being cancelled or closed.
            asyncio.get_running_loop().run_in_executor(None, _cancel_quietly, state.client, job_id)


def _cancel_quietly(client: Client, job_id: str) -> None:
    try:
        client.cancel(job_id)
    except Exception:  # the job is gone or Redis is away: nothing more to do for a caller who left
        log.warning("could not cancel job %s after its caller left", job_id, exc_info=True)
