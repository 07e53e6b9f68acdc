"""OpenAI-compatible routes over the /v1/jobs machinery: `GET /v1/models` and `POST /v1/chat/completions`.

A chat completion is a job like any other (same Client, owner, status record, result, auth and rate
limit; `varco.job_id` names it on /v1/jobs), submitted and then waited for on the job's status events.
A caller that hangs up before the answer cancels its job, so no GPU time goes to answers nobody reads.
Errors come in OpenAI's shape (openai_errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from openai.types import Model
from openai.types.chat import ChatCompletion
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from varco.gateway.access import caller, tenant_of
from varco.gateway.openai_errors import OpenAIError, OpenAIRoute, bad_request, error_responses, model_not_found
from varco.gateway.openai_mapping import (
    ChatJob,
    ChatRequestError,
    UnknownModel,
    model_objects,
    served_models,
    to_chat_completion,
    to_job,
)
from varco.gateway.problems import QUEUE_FULL_RETRY_AFTER_S
from varco.gateway.sse import watch
from varco.gateway.state import GatewayState, gateway
from varco.producer.client import JobNotFound
from varco.tasks.fair_queue import QueueFull
from varco.tasks.requests import InvalidRequest
from varco.tasks.schemas import JobState, JobStatus

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


HUNG_UP = "hung up"


async def _finished_unless_hung_up(request: Request, state: GatewayState, job_id: str) -> JobStatus | str | None:
    """The job's final status, or HUNG_UP if the caller disconnects first."""
    finished = asyncio.ensure_future(_finished(state, job_id))
    hung_up = asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait({finished, hung_up}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled (the server shuts down)
        finished.cancel()
        hung_up.cancel()
        raise
    await _stop(hung_up)
    if finished.done():
        return finished.result()
    await _stop(finished)
    return HUNG_UP


async def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it ends. Asked again while it runs on: redis.asyncio's reads under a
    timeout can swallow one cancellation (it meets their own timeout and reads as "no message yet")."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()  # retrieved: a failure of a task we no longer need is not logged as unhandled


async def _hung_up(request: Request) -> None:
    """Returns when the caller disconnects (the body is read: the next receive waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
                     "description": "a `chat.completion` with a top-level `varco` object (job id, parsed output)"},
               **error_responses(404, 409, 413)},
)  # fmt: skip
async def chat_completions(request: Request, state: State, who: Caller) -> JSONResponse:
    job = _job(await _body(request), state)
    fields = job.request.model_dump(exclude_none=True) | {"tenant": tenant_of(state, who)}
    try:
        [job_id] = await run_in_threadpool(state.client.submit_many, [fields], owner=who)
    except InvalidRequest as exc:  # checks Client adds (the data URI's size)
        raise bad_request(exc.reason, job.param_for(exc.field)) from None
    except QueueFull as exc:  # admission control (docs/tenants.md): nothing was enqueued
        raise OpenAIError(429, str(exc), code="rate_limit_exceeded",
                          headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}) from None  # fmt: skip
    state.metrics.submitted.inc()

    status = await _finished_unless_hung_up(request, state, job_id)
    if status is HUNG_UP:  # the caller left: its answer would reach nobody
        log.info("chat completion %s: the caller disconnected; cancelling its job", job_id)
        with contextlib.suppress(JobNotFound):
            await run_in_threadpool(state.client.cancel, job_id)
        return JSONResponse({}, status_code=499)  # never sent: there is no one to send it to
    if status is None:
        raise OpenAIError(500, f"job {job_id}'s status record expired before it finished", code="job_lost")
    if status.state is JobState.FAILED:
        raise _failed(status, job)
    if status.state is JobState.CANCELLED:
        raise OpenAIError(409, f"job {job_id} was cancelled (DELETE /v1/jobs/{job_id})", code="job_cancelled")
    try:
        result = await run_in_threadpool(state.client.result, job_id, 5.0)
    except Exception as exc:  # the store is down or the object is gone: say so, never a bare 500
        raise OpenAIError(503, f"result could not be read: {type(exc).__name__}: {exc}",
                          code="result_unavailable") from None  # fmt: skip
    completion = to_chat_completion(result)
    return JSONResponse(completion.model_dump(mode="json"), headers={"x-request-id": job_id})
