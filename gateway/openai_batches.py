"""OpenAI's batches API: `POST /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel` and
`GET /v1/batches` (`after`, `limit`). A batch is created `validating`; the runner in each `varco worker`
node's callback process (`producer/batch_runner.py`) validates it and runs its lines as jobs.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from varco.gateway.access import caller, tenant_of
from varco.gateway.openai_errors import OpenAIRoute, bad_request, error_responses
from varco.gateway.openai_files import batches_of, not_found, owner_of, reader_of
from varco.gateway.state import GatewayState, gateway
from varco.producer.batches import BatchNotFound
from varco.tasks.batches import BatchRecord
from varco.tasks.requests import InvalidRequest

router = APIRouter(prefix="/v1", tags=["openai-batch"], route_class=OpenAIRoute,
                   responses=error_responses(400, 401, 404, 429, 500, 503))  # fmt: skip
Caller = Annotated[str, Depends(caller)]
State = Annotated[GatewayState, Depends(gateway)]
CREATE_KEYS = {"input_file_id", "endpoint", "completion_window", "metadata"}


async def owned_batch(state: GatewayState, who: str, batch_id: str) -> BatchRecord:
    try:
        return await run_in_threadpool(batches_of(state).get, batch_id, reader_of(state, who))
    except BatchNotFound:
        raise not_found("batch", batch_id) from None


@router.post("/batches", summary="Start a batch on an uploaded input file")
async def create_batch(request: Request, state: State, who: Caller) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None)
    if unknown := sorted(set(body) - CREATE_KEYS):
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            raise bad_request(f"{name} is required (a string)", name, "missing_required")
    try:
        record = await run_in_threadpool(
            lambda: batches_of(state).create(
                body["input_file_id"], endpoint=body["endpoint"], completion_window=body["completion_window"],
                metadata=body.get("metadata"), owner=owner_of(state, who), tenant=tenant_of(state, who),
            )
        )  # fmt: skip
    except BatchNotFound:
        raise not_found("file", body["input_file_id"]) from None
    except InvalidRequest as exc:
        raise bad_request(str(exc), exc.field) from None
    return record.openai()


@router.get("/batches/{batch_id}", summary="One batch")
async def retrieve_batch(batch_id: str, state: State, who: Caller) -> dict[str, Any]:
    return (await owned_batch(state, who, batch_id)).openai()


@router.post("/batches/{batch_id}/cancel", summary="Cancel a batch: queued lines stop, running ones finish")
async def cancel_batch(batch_id: str, state: State, who: Caller) -> dict[str, Any]:
    await owned_batch(state, who, batch_id)
    return (await run_in_threadpool(batches_of(state).cancel, batch_id)).openai()


@router.get("/batches", summary="The caller's batches, newest first")
async def list_batches(
    state: State, who: Caller, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict[str, Any]:
    found = await run_in_threadpool(batches_of(state).store.batches, owner_of(state, who), after, limit + 1)
    data = [b.openai() for b in found[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(found) > limit}  # fmt: skip
