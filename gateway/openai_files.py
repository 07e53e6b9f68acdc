"""OpenAI's files API for batches: `POST /v1/files` (multipart, `purpose=batch`), `GET /v1/files`,
`GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.

An upload is streamed: the multipart parser spools the part to a temporary file, and it goes on to the
result store a megabyte at a time (`producer/batches.py`), never whole in memory. Files belong to the API
key that made them; another key gets 404, as for an unknown id.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from varco.gateway.access import caller
from varco.gateway.openai_errors import OpenAIError, OpenAIRoute, bad_request, error_responses
from varco.gateway.state import GatewayState, gateway
from varco.producer.batches import Batches, BatchNotFound
from varco.tasks.batches import FileRecord
from varco.tasks.file_objects import CHUNK_BYTES
from varco.tasks.requests import InvalidRequest

router = APIRouter(prefix="/v1", tags=["openai-batch"], route_class=OpenAIRoute,
                   responses=error_responses(400, 401, 404, 429, 500, 503))  # fmt: skip
UPLOAD_PATH = "/v1/files"
MULTIPART_OVERHEAD = 64 * 1024  # the multipart framing and the purpose field around a full-size file
Caller = Annotated[str, Depends(caller)]
State = Annotated[GatewayState, Depends(gateway)]


def owner_of(state: GatewayState, who: str) -> str:
    """Whose a new file or batch is: the key id (empty under --no-auth)."""
    return who if state.keys is not None else ""


def reader_of(state: GatewayState, who: str) -> str | None:
    """Whose files and batches a caller may read: its own (anyone's under --no-auth)."""
    return who if state.keys is not None else None


def batches_of(state: GatewayState) -> Batches:
    return state.client.batches


def not_found(kind: str, item: str) -> OpenAIError:
    return OpenAIError(404, f"No such {kind}: {item}", param="id", code="not_found")


async def owned_file(state: GatewayState, who: str, file_id: str) -> FileRecord:
    try:
        return await run_in_threadpool(batches_of(state).file, file_id, reader_of(state, who))
    except BatchNotFound:
        raise not_found("file", file_id) from None


@router.post("/files", summary="Upload a JSONL batch input file (at most 200 MB and 50,000 lines)")
async def create_file(
    state: State, who: Caller, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
) -> dict[str, Any]:
    def chunks() -> Iterator[bytes]:
        while chunk := file.file.read(CHUNK_BYTES):
            yield chunk

    try:
        record = await run_in_threadpool(batches_of(state).upload, chunks(), file.filename or "upload.jsonl",
                                         purpose, owner_of(state, who))  # fmt: skip
    except InvalidRequest as exc:
        raise bad_request(str(exc), exc.field) from None
    finally:
        await file.close()
    return record.openai()


@router.get("/files", summary="The caller's files, newest first")
async def list_files(
    state: State, who: Caller, purpose: str | None = None, after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:  # fmt: skip
    owner = owner_of(state, who)
    found = await run_in_threadpool(batches_of(state).store.files, owner, purpose, after, limit + 1, order == "asc")
    data = [f.openai() for f in found[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(found) > limit}  # fmt: skip


@router.get("/files/{file_id}", summary="One file")
async def retrieve_file(file_id: str, state: State, who: Caller) -> dict[str, Any]:
    return (await owned_file(state, who, file_id)).openai()


@router.get("/files/{file_id}/content", summary="A file's bytes (a batch's output or error lines)",
            response_class=StreamingResponse)  # fmt: skip
async def file_content(file_id: str, state: State, who: Caller) -> StreamingResponse:
    record = await owned_file(state, who, file_id)
    return StreamingResponse(batches_of(state).content(record), media_type="application/jsonl")


@router.delete("/files/{file_id}", summary="Delete a file")
async def delete_file(file_id: str, state: State, who: Caller) -> dict[str, Any]:
    record = await owned_file(state, who, file_id)
    await run_in_threadpool(batches_of(state).delete_file, record)
    return {"id": file_id, "object": "file", "deleted": True}
