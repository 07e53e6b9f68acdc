"""Messages whose body cannot even be decoded (JSON nested past the parser's depth, say).

Celery logs such a message and acknowledges it, so it never reaches a task and its job would wait in
`queued` forever. This consumer does the same and then tells the app's handler, which ends the job
named by the message's task id (the Client sets it to the job id).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer

log = logging.getLogger(__name__)

UndecodableHandler = Callable[[dict[str, Any], Exception], None]
_handlers: dict[int, UndecodableHandler] = {}  # by id(app): one handler per Celery app


class ReportingConsumer(Consumer):
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        super().on_decode_error(message, exc)  # logs and acks, as Celery does
        handler = _handlers.get(id(self.app))
        if handler is not None:
            try:
                handler(dict(message.headers or {}), exc)
            except Exception:  # the consumer must keep consuming whatever the handler does
                log.exception("could not record an undecodable message")


def on_undecodable(app: Celery, handler: UndecodableHandler) -> None:
    """Have `app`'s workers call `handler(headers, exc)` for each message they cannot decode."""
    _handlers[id(app)] = handler
    app.conf.worker_consumer = f"{__name__}:{ReportingConsumer.__name__}"
