"""A finished job's webhook is queued through a Redis restart instead of being dropped."""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import kombu.exceptions
import pytest
import tenacity

from varco.tasks.celery_app import CALLBACK_QUEUE, CALLBACK_TASK, create_app, queue_depth
from varco.tasks.connections import redis_from_url
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import start_redis
from varco.workers.output.webhooks import send_event

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
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "could not queue job.succeeded callback for job abc"
    # The broker's own error, not the retry loop's wrapper: that is what tells the operator why.
    assert isinstance(record.exc_info[1], kombu.exceptions.OperationalError)


def test_the_queued_message_is_the_delivery_of_this_event(tmp_path: Path) -> None:
    with start_redis(tmp_path) as server:
        app = create_app(Settings(broker_url=server.url, _env_file=None))
        send_event(app, "https://hooks.example.com/x", PAYLOAD)
        with app.connection_for_read() as conn:
            message = conn.SimpleQueue(CALLBACK_QUEUE, no_ack=True).get(timeout=10)
        assert message.headers["task"] == CALLBACK_TASK
        args, kwargs, _ = message.payload
        # The webhook-id is "{job_id}.{type}": the same across retries and redeliveries.
        assert (args, kwargs) == (["https://hooks.example.com/x", PAYLOAD, "abc.job.succeeded"], {})


class FlakyBroker:
    """An app whose broker refuses the first `failures` publishes, then takes them."""

    def __init__(self, failures: int) -> None:
        self.failures, self.published = failures, 0

    def send_task(self, name: str, **options: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise kombu.exceptions.OperationalError("Error 111 connecting to localhost:6379. Connection refused.")
        self.published += 1


def test_queueing_retries_soon_then_at_most_every_five_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(tenacity.nap.time, "sleep", pauses.append)  # record the pauses instead of taking them
    monkeypatch.setattr(random, "uniform", lambda low, high: low)  # no jitter
    broker = FlakyBroker(failures=8)
    send_event(broker, "https://hooks.example.com/x", PAYLOAD)  # type: ignore[arg-type]
    assert broker.published == 1
    assert pauses == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
