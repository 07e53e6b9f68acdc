"""The `varco.infer` task: the thin Celery binding of the job lifecycle (`lifecycle.py`).

It reads the untrusted task arguments, maps Celery's `self.retry` onto the lifecycle's `retry(countdown)`,
and passes the message's delivery tag on. Two Celery hooks end a job's record that never reaches the task:
a `celery control revoke` (the job ends `cancelled`) and a message whose body cannot be decoded (`failed`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.exceptions import Retry
from celery.signals import task_revoked

from varco.tasks.celery_app import INFER_TASK
from varco.tasks.errors import JobError
from varco.tasks.fair_queue import send_ticket
from varco.tasks.job_ids import is_valid_job_id
from varco.tasks.messages import InferMessage
from varco.tasks.schemas import ErrorInfo, JobState
from varco.tasks.tracing import TRACE_HEADERS
from varco.workers.runtime.fair_pick import ticket_of
from varco.workers.runtime.lifecycle import RetryNotQueued, Runtime, deliver, send_missing_terminal_webhook
from varco.workers.runtime.undecodable import on_undecodable

log = logging.getLogger(__name__)


def register_inference_task(app: Celery, get_runtime: Callable[[], Runtime]) -> Task:
    """Register `varco.infer` on `app`, run by the lifecycle on the runtime `get_runtime` returns."""

    @app.task(name=INFER_TASK, bind=True, acks_late=True, max_retries=None)
    def infer(self: Task, *args: Any, **kwargs: Any) -> None:
        rt = get_runtime()
        if rt.fair is not None and (ticket := ticket_of(self.request.id, args, kwargs)) is not None:
            # A ticket: the fair queue picks which tenant's job runs now (docs/tenants.md).
            if (taken := rt.fair.take(ticket)) is not None:
                late = rt.fair.deadline_error(taken) if taken.late else None
                run_message(self, rt, taken.args, taken.kwargs, late, taken.trace)
                rt.fair.release(ticket, taken)  # the run ended; a Retry raised above keeps the ticket's job
            return  # a ticket that took nothing holds nothing to release
        run_message(self, rt, args, kwargs)  # a job message of the format before tickets

    def run_message(
        self: Task, rt: Runtime, args: tuple[Any, ...], kwargs: dict[str, Any], late: JobError | None = None,
        trace: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        message = InferMessage.from_task_args(args, kwargs)  # never raises: the message is not trusted yet
        if message.job_id is None:
            log.error("dropped a %s message (task id %.80r): %s", INFER_TASK, self.request.id, message.problem)
            return
        delivery_tag = (getattr(self.request, "properties", None) or {}).get("delivery_tag")
        # The job's spans continue its submitter's trace; the ticket that carried it here is a link (a
        # ticket may run another job than the one whose submit published it).
        headers = {k: v for k in TRACE_HEADERS if isinstance(v := getattr(self.request, k, None), str)}
        deliver(rt, message.job_id, message, celery_retry(self), delivery_tag=delivery_tag, late=late,
                trace=trace or headers, ticket_trace=headers)  # fmt: skip

    def on_revoked(sender: Task | None = None, request: Any = None, **_: Any) -> None:
        # `celery control revoke` of a queued job: Celery drops its message when it arrives here; the
        # record must end too, or pollers would wait on a job that never runs.
        if getattr(sender, "name", None) != INFER_TASK or request is None or not is_valid_job_id(request.id):
            return
        args = getattr(request, "args", None) or ()
        ticket = ticket_of(request.id, args, getattr(request, "kwargs", None) or {})
        if get_runtime().statuses.transition(request.id, JobState.CANCELLED):
            log.info("job %s cancelled by a Celery revoke", request.id)
            if ticket is None and isinstance(args, list | tuple) and len(args) > 1:  # a job message: its request
                send_missing_terminal_webhook(get_runtime(), request.id, args[1])
        if ticket is not None:
            # The revoked message was the job's ticket; the job still waits in the fair queue. A new ticket
            # keeps one per queued job, and its delivery finds the job cancelled and sends its job.cancelled.
            send_ticket(app, ticket.queue)

    task_revoked.connect(on_revoked, weak=False)

    def fail_undecodable(headers: dict[str, Any], exc: Exception) -> None:
        task_id = headers.get("id")
        if headers.get("task") != INFER_TASK or not is_valid_job_id(task_id):
            return
        error = ErrorInfo(type="InvalidRequest", message=f"the job message cannot be decoded: {exc!s:.300}")
        if get_runtime().statuses.transition(task_id, JobState.FAILED, error=error):
            log.warning("job %s failed: its message cannot be decoded", task_id)

    on_undecodable(app, fail_undecodable)
    return infer


def celery_retry(task: Task) -> Callable[[float], None]:
    """The lifecycle's `retry(countdown)` for one running task: Celery's `Retry` ends the delivery (the
    message is queued again); any other failure to queue it becomes RetryNotQueued."""

    def retry(countdown: float) -> None:
        try:
            raise task.retry(countdown=countdown, max_retries=None)
        except Retry:
            raise
        except Exception as exc:  # Celery raises Reject when the broker would not take the new message
            raise RetryNotQueued(f"could not queue the retry: {exc!r}") from exc

    return retry
