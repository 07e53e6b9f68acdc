"""Cancelling queued and running jobs."""

from __future__ import annotations

import json
import time

import pytest
from conftest import LONG, LONG_ANSWER_TOKENS, RESULTS_BUCKET, forced_tokens
from helpers import WebhookReceiver

from varco.producer import Client, JobCancelled
from varco.tasks.celery_app import queue_depth
from varco.tasks.settings import Settings


def events(receiver: WebhookReceiver, path: str) -> list[str]:
    return [json.loads(r.body)["type"] for r in receiver.received if r.path == path]


def test_cancel_a_queued_job(settings: Settings, worker, http_files) -> None:
    # Route captions to a queue no worker consumes, so the job stays queued.
    parked = Client(settings.model_copy(update={"task_routes": {"caption": "varco.parked"}}))
    depth, waiting = queue_depth(parked.redis, "varco.parked"), parked.fair.depth("default")
    job_id = parked.submit(http_files.base + "/cat.png", "caption", priority=9)
    assert parked.status(job_id).state.value == "queued"
    assert queue_depth(parked.redis, "varco.parked") == depth + 1  # its ticket
    assert parked.fair.depth("default") == waiting + 1  # the job, in its tenant's fair queue
    assert parked.cancel(job_id) is True
    status = parked.status(job_id)
    assert status.state.value == "cancelled" and status.finished_at is not None
    with pytest.raises(JobCancelled):
        parked.result(job_id, timeout=5)
    assert parked.cancel(job_id) is True  # cancelling again is harmless


def test_cancel_a_running_job_stops_generation(
    client: Client, http_files, s3, worker_env, receiver: WebhookReceiver
) -> None:
    before = forced_tokens(worker_env, LONG)
    url = http_files.add("/long.png", LONG)
    hook = "/cancel/running"
    job_id = client.submit(
        url, "caption", max_new_tokens=LONG_ANSWER_TOKENS + 500, callback_url=receiver.url(hook)
    )  # scripted, no EOS before
    # Cancel once its tokens are being generated, not while it is still fetched or waiting for a batch.
    deadline = time.monotonic() + 60
    while forced_tokens(worker_env, LONG) == before:
        assert time.monotonic() < deadline, "the long job never started generating"
        time.sleep(0.05)
    assert client.status(job_id).state.value == "started"
    assert client.cancel(job_id) is True
    [status] = client.wait(job_id, timeout=60)
    assert status.state.value == "cancelled"
    # Generation stopped: the script was not forced to its end (a cancel that did nothing would reach it).
    assert forced_tokens(worker_env, LONG) - before < LONG_ANSWER_TOKENS
    listing = s3.list_objects_v2(Bucket=RESULTS_BUCKET, Prefix=f"jobs/{job_id}")
    assert listing.get("KeyCount", 0) == 0  # no result written
    # The engine is free again.
    ok = client.submit(http_files.base + "/cat.png", "caption", callback_url=receiver.url(hook + "/marker"))
    assert next(client.wait(ok, timeout=60)).state.value == "succeeded"
    # A backend driven by webhooks sees the job end: job.cancelled follows job.started, once.
    receiver.wait_for(lambda _: "job.cancelled" in events(receiver, hook), timeout=60)
    receiver.wait_for(lambda _: "job.succeeded" in events(receiver, hook + "/marker"), timeout=60)
    assert events(receiver, hook) == ["job.started", "job.cancelled"]
    [cancelled] = [json.loads(r.body) for r in receiver.received if r.path == hook and b"job.cancelled" in r.body]
    assert (cancelled["job_id"], cancelled["state"], cancelled["result_uri"]) == (job_id, "cancelled", None)


def test_cancel_a_finished_job_returns_false(client: Client, http_files) -> None:
    job_id = client.submit(http_files.base + "/cat.png", "caption")
    assert next(client.wait(job_id, timeout=60)).state.value == "succeeded"
    assert client.cancel(job_id) is False
    assert client.status(job_id).state.value == "succeeded"
