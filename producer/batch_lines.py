"""One Batch API line, both ways, without I/O: an input line becomes a job request (the chat completion
mapping of `gateway/openai_mapping.py`, the same as `POST /v1/chat/completions`), and a finished job becomes
an output or error line `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from varco.tasks.batches import LineError
from varco.tasks.requests import InvalidRequest, JobRequest
from varco.tasks.schemas import ErrorInfo, JobResult

ENDPOINT = "/v1/chat/completions"
MAX_CUSTOM_ID = 512
# Failures of the image the line named: a 400 for them, like OpenAI's for an image it cannot read.
IMAGE_ERRORS = ("ImageFetchError", "ForbiddenURLError", "ImageTooLargeError", "ImageDecodeError")
LINE_KEYS = {"custom_id", "method", "url", "body"}


@dataclass(frozen=True)
class Line:
    custom_id: str
    request: JobRequest


def parse_line(raw: bytes, number: int, served: tuple[str, ...], endpoint: str = ENDPOINT) -> Line | LineError:
    """Line `number` (1-based) as a job request, or what is wrong with it."""
    from varco.gateway.openai_mapping import ChatRequestError, UnknownModel, to_job  # openai types: lazily

    def error(code: str, message: str, param: str | None = None) -> LineError:
        return LineError(code=code, message=f"line {number}: {message}", line=number, param=param)

    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return error("invalid_json", f"not a JSON object on one line (JSONL): {exc}")
    if not isinstance(value, dict):
        return error("invalid_json", "each line must be a JSON object")
    if unknown := sorted(set(value) - LINE_KEYS):
        return error("invalid_request", f"unknown key {unknown[0]!r}; a line holds {sorted(LINE_KEYS)}", unknown[0])
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        return error("invalid_custom_id", f"custom_id must be a string of 1..{MAX_CUSTOM_ID} characters",
                     "custom_id")  # fmt: skip
    if value.get("method") != "POST":
        return error("invalid_method", f"method must be 'POST', got {value.get('method')!r}", "method")
    if value.get("url") != endpoint:
        return error("invalid_url", f"url must be the batch's endpoint {endpoint!r}, got {value.get('url')!r}",
                     "url")  # fmt: skip
    try:
        job = to_job(value.get("body"), served)
    except UnknownModel as exc:
        return error("model_not_found", f"the model {exc.model!r} is not served", "body.model")
    except ChatRequestError as exc:
        return error(exc.code, exc.message, f"body.{exc.param}" if exc.param else "body")
    except InvalidRequest as exc:
        return error("invalid_value", str(exc), "body")
    return Line(custom_id, job.request)


def _line(job_id: str | None, custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None
          ) -> dict[str, Any]:  # fmt: skip
    return {"id": f"batch_req_{job_id or custom_id}", "custom_id": custom_id, "response": response, "error": error}


def output_line(custom_id: str, result: JobResult) -> dict[str, Any]:
    from varco.gateway.openai_mapping import to_chat_completion

    body = to_chat_completion(result).model_dump(mode="json")
    return _line(result.job_id, custom_id, {"status_code": 200, "request_id": result.job_id, "body": body}, None)


def failed_line(custom_id: str, job_id: str, error: ErrorInfo | None) -> dict[str, Any]:
    """A job that failed: its error as the response body a chat completion would have answered with."""
    kind = error.type if error else "job_failed"
    image = kind in IMAGE_ERRORS
    status = 400 if image else 500
    message = f"{kind}: {error.message}" if error else "the job failed"
    body = {"error": {"message": message, "type": "invalid_request_error" if image else "server_error",
                      "param": "messages[0].content" if image else None,
                      "code": "invalid_image" if image else kind}}  # fmt: skip
    return _line(job_id, custom_id, {"status_code": status, "request_id": job_id, "body": body}, None)


def unanswered_line(custom_id: str, job_id: str | None, code: str, message: str) -> dict[str, Any]:
    """A line with no answer: `batch_expired`, `batch_cancelled`, or a result the store could not give."""
    return _line(job_id, custom_id, None, {"code": code, "message": message})
