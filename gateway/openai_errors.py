"""Errors in OpenAI's shape for the OpenAI-compatible routes: `{"error": {"message", "type", "param", "code"}}`.

The `openai` SDK picks its exception class from the status alone (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 409 ConflictError, 422 UnprocessableEntityError, 429
RateLimitError, 5xx InternalServerError) and reads `message`, `type`, `param` and `code` from the body.
The /v1/jobs API keeps its problem+json shape (problems.py); `OpenAIRoute` translates the problems the
shared dependencies raise (auth, rate limit, body limits, Redis) for the routes it serves.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.exceptions
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from varco.gateway.problems import Problem
from varco.tasks.connections import BrokerUnavailable

log = logging.getLogger(__name__)
# OpenAI's `type` for each status (what its API sends; the SDK does not depend on it).
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
# Our problem kinds (problems.py) as OpenAI-style codes, where OpenAI has one.
_CODES = {
    "unauthorized": "invalid_api_key",
    "rate-limited": "rate_limit_exceeded",
    "broker-unavailable": "service_unavailable",
    "result-unavailable": "service_unavailable",
    "body-too-large": "request_too_large",
    "body-timeout": "request_timeout",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """What every error on the OpenAI routes answers with."""

    error: ErrorDetail


class OpenAIError(Exception):
    """Raise in an OpenAI route to answer in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=_TYPES.get(self.status, "server_error"), param=self.param,
                             code=self.code)  # fmt: skip
        return ErrorBody(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404, f"The model {model!r} does not exist; GET /v1/models lists the served ones.", param="model",
        code="model_not_found",
    )  # fmt: skip


def problem_as_openai(problem: Problem) -> OpenAIError:
    code = _CODES.get(problem.kind, problem.kind.replace("-", "_"))
    return OpenAIError(problem.status, problem.detail, param=problem.field, code=code, headers=problem.headers)


def from_exception(exc: Exception) -> OpenAIError | None:
    """The OpenAI-shaped form of an error the shared gateway code raises; None for anything else."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, Problem):
        return problem_as_openai(exc)
    if isinstance(exc, BrokerUnavailable | redis.exceptions.RedisError):
        retry = {"Retry-After": "5"}
        return OpenAIError(503, f"Redis is unavailable: {exc}", code="service_unavailable", headers=retry)
    if isinstance(exc, RequestValidationError):  # path, query and header checks (the body is read raw)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return bad_request(f"invalid request: {first.get('msg', exc)}", param)
    if isinstance(exc, StarletteHTTPException):
        return OpenAIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
    return None


def is_openai_path(path: str) -> bool:
    """Whether `path` is one of the OpenAI routes (for answers sent before routing, like BodyLimits' 413)."""
    return path == "/v1/chat/completions" or path.startswith(("/v1/models", "/v1/files", "/v1/batches"))


class OpenAIRoute(APIRoute):
    """An APIRoute whose errors, its dependencies' included, answer in OpenAI's shape.

    FastAPI's exception handlers are app-wide; this keeps the translation to the routes that need it,
    so /v1/jobs answers problem+json as before.
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def openai_shaped(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                if (error := from_exception(exc)) is None:
                    log.exception("%s %s failed", request.method, request.url.path)
                    error = OpenAIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
                return error.response()

        return openai_shaped


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries documenting OpenAI-shaped error responses."""
    return {s: {"model": ErrorBody, "description": _TYPES.get(s, "error")} for s in statuses}
