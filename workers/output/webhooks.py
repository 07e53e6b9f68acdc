"""Webhook sending, from the job's task thread: each event is queued on `varco.callbacks`, never POSTed here.

The callback process (`webhook_delivery.py`) does the HTTP; a GPU job only puts a small message on the
broker, retrying through a broker outage, and never fails because of its webhook.

The task threads of one process queue their events through one `GroupCommit`: events queued while a
publish is running go out together as one `varco.callback.batch` message (one LPUSH, and one BRPOP, ZADD
and ZREM on the callback side, for all of them). A lone event goes as the single `varco.callback` message
it always was (what a callback process of any version delivers).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from celery import Celery
from pydantic import BaseModel, Field

from varco.tasks import tracing
from varco.tasks.celery_app import CALLBACK_BATCH_QUEUE, CALLBACK_BATCH_TASK, CALLBACK_QUEUE, CALLBACK_TASK
from varco.tasks.group_commit import GroupCommit
from varco.tasks.requests import JobRequest
from varco.tasks.schemas import ErrorInfo, JobState, WebhookEvent
from varco.workers.net.retry import retry_within

log = logging.getLogger(__name__)


# The webhook that ends each terminal state: one of them is sent once per job (exactly-once rules in
# docs/webhooks.md), so a backend driven by webhooks never sees a job stop at job.started.
TERMINAL_EVENTS: dict[JobState, str] = {
    JobState.SUCCEEDED: "job.succeeded",
    JobState.FAILED: "job.failed",
    JobState.CANCELLED: "job.cancelled",
}


def terminal_event(state: JobState) -> str | None:
    """The webhook event that reports `state`, or None for a state that is not terminal."""
    return TERMINAL_EVENTS.get(state)


def event_payload(
    event: str,
    job_id: str,
    request: JobRequest,
    state: JobState,
    ts: str,
    *,
    result_uri: str | None = None,
    error: ErrorInfo | None = None,
) -> dict[str, Any]:
    """The webhook body for one event (tasks.schemas.WebhookEvent), as JSON-ready data."""
    return WebhookEvent(
        type=event, job_id=job_id, task=request.task.value, state=state, result_uri=result_uri, error=error,
        metadata=request.metadata, tenant=request.tenant, timestamp=ts,
    ).model_dump(mode="json")  # fmt: skip


class WebhookItem(BaseModel):
    """One event of a `varco.callback.batch` message: what a single `varco.callback` message carries as its
    arguments (url, payload, webhook-id) and its headers (the job's trace context)."""

    url: str
    payload: dict[str, Any]
    msg_id: str  # the webhook-id, "{job_id}.{type}": the same across retries and redeliveries
    trace: dict[str, str] = Field(default_factory=dict)  # W3C traceparent/tracestate of the job's span


# How long a finished job's task thread keeps trying to queue its webhook while the broker is away (a Redis
# restart or a Sentinel failover): Celery's own publish retries give up within about a second.
QUEUE_RETRY_S = 120.0
# Events per message at most: a batch message stays small (a payload is a few hundred bytes).
MAX_BATCH = 32
# How long a publish waits for the other events of its engine batch (as the status store's claims and ends do):
# a job's webhook is asynchronous to its caller anyway, and each event it gathers saves a broker message.
LINGER_S = 0.002


def publish(app: Celery, items: list[WebhookItem]) -> list[None]:
    """Put `items` on the callback queue as one message: a lone one as `varco.callback`, more as a batch."""
    if len(items) == 1:
        (item,) = items
        args = [item.url, item.payload, item.msg_id]
        app.send_task(CALLBACK_TASK, args=args, queue=CALLBACK_QUEUE, headers=item.trace or None)
    else:
        batch = [item.model_dump() for item in items]
        app.send_task(CALLBACK_BATCH_TASK, args=[batch], queue=CALLBACK_BATCH_QUEUE)
    return [None] * len(items)


# One GroupCommit per app (a worker process has one app): its task threads share it.
_groups: weakref.WeakKeyDictionary[Any, GroupCommit[WebhookItem, None]] = weakref.WeakKeyDictionary()
_groups_lock = threading.Lock()


def _group(app: Celery) -> GroupCommit[WebhookItem, None]:
    with _groups_lock:
        group = _groups.get(app)
        if group is None:
            ref = weakref.ref(app)  # the group must not keep its app (its key here) alive

            def flush(items: list[WebhookItem]) -> list[None]:
                live = ref()
                assert live is not None  # a caller holds the app
                return publish(live, items)

            group = _groups[app] = GroupCommit(flush, MAX_BATCH, linger_s=LINGER_S)
        return group


def send_event(app: Celery, url: str, payload: dict[str, Any], *, retry_s: float = QUEUE_RETRY_S) -> None:
    """Queue one webhook, retrying through a broker outage of up to `retry_s`; never raises into the job.
    Returns once the event is on the broker (alone, or in a batch with the events of other task threads).

    The first retry comes 0.2 s after a failed attempt, the pause doubles, and attempts are never more
    than 5 s apart (each pause plus up to 1 s of jitter, within the 5 s): a broker that comes back is
    used within seconds. Each caller retries on its own deadline; retries of several go out together.
    """
    # The job's span, taken in this thread: the delivery continues the job's trace.
    item = WebhookItem(
        url=url, payload=payload, msg_id=f"{payload['job_id']}.{payload['type']}", trace=tracing.inject()
    )
    group = _group(app)
    try:
        for attempt in retry_within(retry_s):
            with attempt:
                group.call(item)
    except Exception:  # still unreachable: the job's outcome stands, its webhook is lost (logged)
        log.exception("could not queue %s callback for job %s", payload["type"], payload["job_id"])
