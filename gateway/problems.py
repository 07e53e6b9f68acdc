"""Errors as RFC 9457 problem details (`application/problem+json`), for every error the gateway sends."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from varco.tasks.fair_queue import QueueFull

PROBLEM_MEDIA_TYPE = "application/problem+json"
QUEUE_FULL_RETRY_AFTER_S = 5  # a guess that spares the broker a hot retry loop; the queue's drain rate varies
_TYPE_PREFIX = "urn:varco:problem:"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    409: "Conflict",
    413: "Request body too large",
    422: "Invalid request",
    429: "Too many requests",
    503: "Service unavailable",
}


class ProblemDetails(BaseModel):
    """RFC 9457 problem details; `field` names the offending input, `index` its place in a batch."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str | None = None
    field: str | None = None
    index: int | None = None


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem document. `kind` becomes the type URN."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail, self.field = status, kind, detail, field
        self.headers = headers or {}
        self.extra = extra


def problem_body(status: int, kind: str, detail: str | None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": _TYPE_PREFIX + kind, "title": _TITLES.get(status, "Error"), "status": status}
    if detail is not None:
        body["detail"] = detail
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def problem_response(
    status: int, kind: str, detail: str | None, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, kind, detail, **extra), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE
    )


async def _on_problem(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.status, exc.kind, exc.detail, exc.headers, field=exc.field, **exc.extra)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path: Starlette's 405 names only the first route's. A path
    spelled out in full (`/v1/jobs/batch`) is its own resource, as in the OpenAPI document, not one
    value of a template beside it (`/v1/jobs/{job_id}`)."""
    matching = [r for r in request.app.router.routes if r.matches({**request.scope, "method": ""})[0] is not Match.NONE]
    exact = [r for r in matching if not getattr(r, "param_convertors", None)]
    return ", ".join(sorted({m for r in exact or matching for m in getattr(r, "methods", None) or ()}))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return problem_response(exc.status_code, kind, str(exc.detail), headers)


async def _on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's parameter checks (path, query, headers), reported the way InvalidRequest reports a body."""
    assert isinstance(exc, RequestValidationError)
    parts, field = [], None
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"][1:])  # drop "query"/"path"/"header"
        field = field or where or None
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return problem_response(422, "invalid-request", "invalid request: " + "; ".join(parts), field=field)


async def _on_queue_full(_: Request, exc: Exception) -> JSONResponse:
    """VARCO_MAX_QUEUED(_PER_TENANT) reached: nothing was enqueued; come back once the queue has drained a bit."""
    assert isinstance(exc, QueueFull)
    headers = {"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}
    return problem_response(429, "queue-full", str(exc), headers, limit=exc.limit, depth=exc.depth)


def install(app: Any) -> None:
    app.add_exception_handler(QueueFull, _on_queue_full)
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries documenting problem responses (the schema is added to components by app.py)."""
    ref = {"$ref": "#/components/schemas/ProblemDetails"}
    return {s: {"description": _TITLES[s], "content": {PROBLEM_MEDIA_TYPE: {"schema": ref}}} for s in statuses}
