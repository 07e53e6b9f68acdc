"""Worker logging: text or one JSON object per line (`VARCO_LOG_FORMAT`), job fields, no URL secrets.

A filter adds `job_id`, `task` and `worker` where a job is being handled (a context variable set
around each delivery), and `trace_id`, `span_id` where a span is current (tracing on, tasks/tracing.py);
the formatter strips query strings from every URL in the finished line (`tasks/redaction.py`, shared
with the gateway's access log), so a presigned URL's signature never reaches a log (httpx logs every
request's URL at INFO, Celery attaches task arguments to its records).
JSON lines come from python-json-logger, which keeps every extra field of a record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from varco.tasks import tracing
from varco.tasks.redaction import redact_text

_job: ContextVar[dict[str, str]] = ContextVar("varco_job", default={})  # noqa: B039 - never mutated

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(worker_label)s] %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """Formats with `inner`, then cuts query strings from every URL in the whole line: the message,
    a traceback, and extra fields such as the task arguments Celery attaches to its records."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(self.inner.format(record))


class JobFields(logging.Filter):
    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        record.worker_label = self.worker
        for key, value in _job.get().items():
            setattr(record, key, value)
        for key, value in tracing.log_ids().items():  # trace_id, span_id: the line links to its trace
            setattr(record, key, value)
        return True


@contextmanager
def job_context(**fields: Any) -> Iterator[None]:
    """Log records inside carry these fields (job_id, task)."""
    token = _job.set({k: str(v) for k, v in fields.items() if v is not None})
    try:
        yield
    finally:
        _job.reset(token)


def log_format_from_env() -> str:
    """VARCO_LOG_FORMAT, read before the rest of the settings (whose errors must be logged too)."""
    from pydantic import ValidationError

    from varco.tasks.settings import Settings

    try:
        return Settings().log_format
    except ValidationError:
        return "text"


def configure_logging(worker: str, log_format: str | None = None) -> None:
    log_format = log_format or log_format_from_env()
    handler = logging.StreamHandler()
    if log_format == "json":
        inner: logging.Formatter = JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            reserved_attrs=[*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "worker_label"],
        )
    else:
        inner = logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(RedactingFormatter(inner))
    handler.addFilter(JobFields(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings become records too: one format on the stream
