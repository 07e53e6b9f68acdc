"""Webhook sending, from the job's task thread: each event is queued on `varco.callbacks`, never POSTed here.

The callback process (`webhook_delivery.py`) does the HTTP; a GPU job only puts a small message on the
broker, retrying through a broker outage, and never fails because of its webhook.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from varco.tasks import tracing
from varco.tasks.celery_app import CALLBACK_QUEUE, CALLBACK_TASK
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


# How long a finished job's task thread keeps trying to queue its webhook while the broker is away (a Redis
# restart or a Sentinel failover): Celery's own publish retries give up within about a second.
QUEUE_RETRY_S = 120.0


def send_event(app: Celery, url: str, payload: dict[str, Any], *, retry_s: float = QUEUE_RETRY_S) -> None:
    """Queue one webhook, retrying through a broker outage of up to `retry_s`; never raises into the job.

    The first retry comes 0.2 s after a failed attempt, the pause doubles, and attempts are never more
    than 5 s apart (each pause plus up to 1 s of jitter, within the 5 s): a broker that comes back is
    used within seconds.
    """
    args = [url, payload, f"{payload['job_id']}.{payload['type']}"]
    headers = tracing.inject() or None  # the job's span: the delivery continues the job's trace
    try:
        for attempt in retry_within(retry_s):
            with attempt:
                app.send_task(CALLBACK_TASK, args=args, queue=CALLBACK_QUEUE, headers=headers)
    except Exception:  # still unreachable: the job's outcome stands, its webhook is lost (logged)
        log.exception("could not queue %s callback for job %s", payload["type"], payload["job_id"])
