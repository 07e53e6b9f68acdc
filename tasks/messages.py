"""The `varco.infer` message as a worker receives it: checked in full before anything is fetched or run.

A message can reach the broker without passing through `Client` (anyone who can write to Redis), so
the worker re-checks everything the Client checks: the job id pattern, the request model, the size of
an inline image, metadata limits, and the message's own fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from varco.tasks.job_ids import is_valid_job_id
from varco.tasks.requests import InvalidRequest, JobRequest, _describe, check_data_uri_size

_ARG_NAMES = ("job_id", "request", "enqueued_at")


@dataclass(frozen=True)
class InferMessage:
    """The arguments of one `varco.infer` message, not yet trusted."""

    job_id: str | None  # None: no usable job id (the message can only be dropped)
    request: Any = None
    enqueued_at: Any = None
    problem: str | None = None  # what is wrong with the arguments themselves, if anything

    @classmethod
    def from_task_args(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> InferMessage:
        """Bind `infer(job_id, request, enqueued_at=None)` by hand: a wrong call is a finding, not a TypeError."""
        values: dict[str, Any] = dict(zip(_ARG_NAMES, args, strict=False))
        problems = [f"{len(args)} positional arguments; expected at most 3"] if len(args) > len(_ARG_NAMES) else []
        for name, value in kwargs.items():
            if name not in _ARG_NAMES or name in values:
                problems.append(f"unexpected or repeated argument {name!r}")
            values.setdefault(name, value)
        if "request" not in values:
            problems.append("no request")
        job_id = values.get("job_id")
        if not is_valid_job_id(job_id):
            return cls(None, problem=f"job id {job_id!r:.80} does not match the job id pattern")
        return cls(job_id, values.get("request"), values.get("enqueued_at"), "; ".join(problems) or None)

    def validate(self, max_data_uri_bytes: int) -> tuple[JobRequest, str | None]:
        """The request and enqueue time, checked as the Client checks them; InvalidRequest otherwise."""
        if self.problem:
            raise InvalidRequest(f"invalid job message: {self.problem}")
        try:
            request = JobRequest.model_validate(self.request)
        except ValidationError as exc:
            raise InvalidRequest(f"invalid job request: {_describe(exc)}") from None
        except RecursionError:  # a validator nesting deeper than Python's stack before our own limit
            raise InvalidRequest("invalid job request: nested too deeply") from None
        check_data_uri_size(request.image_uri, max_data_uri_bytes)
        return request, _enqueued_at(self.enqueued_at)


def _enqueued_at(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"invalid job message: enqueued_at must be an ISO 8601 string, got {type(value).__name__}")
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"invalid job message: enqueued_at is not an ISO 8601 time: {value[:40]!r}") from None
    return value
