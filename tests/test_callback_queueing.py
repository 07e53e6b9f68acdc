"""A finished job's webhook is queued through a Redis restart instead of being dropped."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from varco.tasks.celery_app import CALLBACK_QUEUE, create_app, queue_depth
from varco.tasks.connections import redis_from_url
from varco.tasks.settings import Settings
from varco.workers.callbacks import send_event
from varco.workers.devtools.local_redis import start_redis

PAYLOAD = {"type": "job.succeeded", "job_id": "abc", "state": "succeeded"}


def test_a_webhook_is_queued_once_redis_is_back(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    port = server.port
    app = create_app(Settings(broker_url=server.url, _env_file=None))
    server.stop()  # Redis is away when the job finishes
    done = threading.Event()
    sender = threading.Thread(target=lambda: (send_event(app, "https://hooks.example.com/x", PAYLOAD), done.set()))
    sender.start()
    time.sleep(2.0)  # longer than Celery's own publish retries: the old code had dropped the webhook by now
    assert not done.is_set(), "send_event returned while Redis was down: the webhook was dropped"
    restarted = start_redis(tmp_path, port=port)
    try:
        assert done.wait(60), "send_event never returned after Redis came back"
        assert queue_depth(redis_from_url(restarted.url), CALLBACK_QUEUE) == 1
    finally:
        restarted.stop()


def test_a_broker_that_stays_away_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = start_redis(tmp_path)
    app = create_app(Settings(broker_url=server.url, _env_file=None))
    server.stop()
    send_event(app, "https://hooks.example.com/x", PAYLOAD, retry_s=1.0)  # returns: never fails the job
    assert "could not queue job.succeeded callback for job abc" in caplog.text
