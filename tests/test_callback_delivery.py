"""Webhook delivery's retry policy and address rule, against a real local receiver.

The delivery task runs eagerly (Celery's `apply`): a retry reruns it at once, in this thread, so
every attempt has happened when `apply` returns and the receiver's count is final. Backoff between
attempts is the worker's business; here only which answers are retried matters.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import WebhookReceiver

from varco.tasks.celery_app import create_app
from varco.tasks.settings import Settings
from varco.workers.callbacks import register_callback_task

RETRIES = 2
PAYLOAD = {"type": "job.succeeded", "job_id": "j1"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.close()


def deliver(receiver: WebhookReceiver, path: str, *, allow_private: bool = True) -> int:
    """POST one event to `path` as the callback worker does; returns how many requests the receiver got."""
    settings = Settings(
        broker_url="memory://", allow_private_urls=allow_private, callback_max_retries=RETRIES, _env_file=None
    )
    task = register_callback_task(create_app(settings), settings)
    task.apply(args=[receiver.url(path), PAYLOAD, "j1.job.succeeded"])  # eager; running out of retries is not raised
    return sum(r.path == path for r in receiver.received)


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_408_429_and_5xx_are_retried_until_the_retries_run_out(receiver: WebhookReceiver, status: int) -> None:
    path = f"/retry/{status}"
    receiver.status_for = lambda p: status if p == path else 204
    assert deliver(receiver, path) == 1 + RETRIES


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
def test_other_4xx_are_not_retried(receiver: WebhookReceiver, status: int) -> None:
    path = f"/final/{status}"
    receiver.status_for = lambda p: status if p == path else 204
    assert deliver(receiver, path) == 1


def test_a_retried_delivery_stops_at_the_first_success(receiver: WebhookReceiver) -> None:
    answers = iter([503, 429, 204])
    receiver.status_for = lambda p: next(answers) if p == "/flaky" else 204
    assert deliver(receiver, "/flaky") == 3
    bodies = {r.body for r in receiver.received if r.path == "/flaky"}
    assert len(bodies) == 1  # the same event each time


def test_callback_urls_obey_the_private_address_rule(receiver: WebhookReceiver) -> None:
    receiver.status_for = lambda p: 204
    assert deliver(receiver, "/private", allow_private=False) == 0  # 127.0.0.1: refused, never contacted
    assert deliver(receiver, "/private-allowed", allow_private=True) == 1
