"""A job whose run died between its terminal transition and its webhook (kill -9 in that window) still
gets its terminal webhook: the next delivery of its message finds it ended with no webhook queued and
sends it; later deliveries send nothing more."""

from __future__ import annotations

import json
import uuid

from helpers import WebhookReceiver

from varco.producer import Client
from varco.tasks.celery_app import INFER_TASK
from varco.tasks.schemas import JobState
from varco.tasks.status import now_iso


def redeliver(client: Client, job_id: str, request: dict) -> None:
    """What kombu's restore does for a dead worker's message: the same job comes back."""
    client.app.send_task(INFER_TASK, args=[job_id, request, now_iso()], task_id=job_id)


def test_a_run_that_died_before_its_webhook_gets_it_sent_once(
    client: Client, http_files, receiver: WebhookReceiver
) -> None:
    job_id = uuid.uuid4().hex
    hook = f"/terminal/{job_id}"
    request = {"image_uri": http_files.base + "/cat.png", "task": "caption", "callback_url": receiver.url(hook)}
    client.statuses.create(job_id, "caption")
    # The dead run got as far as its terminal transition.
    assert client.statuses.transition(job_id, JobState.SUCCEEDED, result_uri="s3://varco-results/jobs/x.json")
    redeliver(client, job_id, request)
    got = receiver.wait_for(lambda rs: any(r.path == hook for r in rs), timeout=60)
    event = json.loads(next(r for r in got if r.path == hook).body)
    assert (event["type"], event["job_id"], event["result_uri"]) == (
        "job.succeeded", job_id, "s3://varco-results/jobs/x.json"
    )  # fmt: skip
    # Another copy of the message: the webhook was queued already, so nothing more is sent.
    redeliver(client, job_id, request)
    marker_hook = f"/terminal/marker-{job_id}"
    marker = client.submit(http_files.base + "/cat.png", "caption", callback_url=receiver.url(marker_hook))
    assert next(client.wait(marker, timeout=60)).state.value == "succeeded"
    receiver.wait_for(lambda rs: any(r.path == marker_hook for r in rs), timeout=60)
    assert sum(r.path == hook for r in receiver.received) == 1


def test_a_job_cancelled_while_queued_gets_its_job_cancelled_webhook_once(
    client: Client, http_files, receiver: WebhookReceiver
) -> None:
    job_id = uuid.uuid4().hex
    hook = f"/terminal/cancelled-{job_id}"
    request = {
        "image_uri": http_files.base + "/cat.png", "task": "caption", "callback_url": receiver.url(hook),
        "callback_events": ["job.cancelled"],
    }  # fmt: skip
    client.statuses.create(job_id, "caption")
    assert client.cancel(job_id) is True  # still queued: cancelled at once, the message still on its way
    redeliver(client, job_id, request)
    got = receiver.wait_for(lambda rs: any(r.path == hook for r in rs), timeout=60)
    event = json.loads(next(r for r in got if r.path == hook).body)
    assert (event["type"], event["job_id"], event["state"]) == ("job.cancelled", job_id, "cancelled")
    redeliver(client, job_id, request)  # another copy: the webhook was queued already
    marker_hook = f"/terminal/marker-{job_id}"
    marker = client.submit(http_files.base + "/cat.png", "caption", callback_url=receiver.url(marker_hook))
    assert next(client.wait(marker, timeout=60)).state.value == "succeeded"
    receiver.wait_for(lambda rs: any(r.path == marker_hook for r in rs), timeout=60)
    assert sum(r.path == hook for r in receiver.received) == 1
