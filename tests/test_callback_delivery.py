"""Webhook delivery's retry policy, address rule and DNS outcomes, against a real local receiver.

The delivery task runs eagerly (Celery's `apply`): a retry reruns it at once, in this thread, so
every attempt has happened when `apply` returns and the receiver's count is final. Backoff between
attempts is the worker's business; here only which answers are retried matters.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from helpers import PUBLIC, ScriptedResolver, WebhookReceiver

from varco.tasks.celery_app import create_app
from varco.tasks.settings import Settings
from varco.workers import metrics
from varco.workers.callbacks import register_callback_task

PAYLOAD = {"type": "job.succeeded", "job_id": "abc", "state": "succeeded"}
RETRIES = 2


def outcomes() -> dict[str, float]:
    return {o: metrics.CALLBACKS.labels(outcome=o)._value.get() for o in ("retry", "refused")}


def deliver_task(**settings: object):
    app = create_app(Settings(broker_url="memory://", **settings))
    app.conf.task_always_eager = True
    return register_callback_task(app, Settings(callback_max_retries=2, **settings))


def test_a_dns_failure_is_retried_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def no_dns(host, *args, **kwargs):
        calls.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    before = outcomes()
    result = deliver_task().apply(args=["https://hooks.example.com/x", PAYLOAD, "abc.job.succeeded"])
    assert result.state == "FAILURE"  # retries used up (eagerly), not returned as refused
    assert calls == ["hooks.example.com"] * 3
    after = outcomes()
    assert after["retry"] - before["retry"] == 3 and after["refused"] == before["refused"]


def test_a_private_receiver_is_refused_once() -> None:
    before = outcomes()
    result = deliver_task().apply(args=["http://127.0.0.1:9/x", PAYLOAD, "abc.job.succeeded"])
    assert result.state == "SUCCESS" and result.result == 0
    assert outcomes()["refused"] - before["refused"] == 1


def test_a_rebinding_callback_host_is_never_connected_to(scripted_dns: ScriptedResolver) -> None:
    """The receiver on loopback would accept the webhook if reached; the name answered public first."""
    receiver = WebhookReceiver()
    try:
        port = receiver.server.server_port
        scripted_dns.answers["hooks.test"] = [PUBLIC, "127.0.0.1"]
        result = deliver_task().apply(args=[f"http://hooks.test:{port}/x", PAYLOAD, "abc.job.succeeded"])
        # Attempt 1 connects to the public answer it checked (nothing listens there) and is retried;
        # attempt 2 is told loopback and refuses it. The loopback receiver is never reached.
        assert (result.state, result.result) == ("SUCCESS", 0)
        assert receiver.received == []
        assert scripted_dns.calls["hooks.test"] == 2
    finally:
        receiver.close()


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
    task.apply(args=[receiver.url(path), PAYLOAD, "abc.job.succeeded"])  # eager; running out of retries is not raised
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


def test_a_delivered_webhook_that_comes_back_is_not_sent_again(receiver: WebhookReceiver, tmp_path) -> None:
    """Its POST went through but its ack was lost (a Redis restart): the broker hands the same delivery out
    again, and the delivered-log stops it."""
    from varco.tasks.connections import redis_from_url
    from varco.workers.callbacks import DeliveredLog
    from varco.workers.devtools.local_redis import start_redis

    receiver.status_for = lambda p: 204
    with start_redis(tmp_path) as server:
        settings = Settings(broker_url="memory://", allow_private_urls=True, _env_file=None)
        log = DeliveredLog(redis_from_url(server.url), ttl=60)
        task = register_callback_task(create_app(settings), settings, log)
        for _ in range(2):
            task.apply(args=[receiver.url("/once"), PAYLOAD, "abc.job.succeeded"])
        assert sum(r.path == "/once" for r in receiver.received) == 1
        other = register_callback_task(create_app(settings), settings, log)
        other.apply(args=[receiver.url("/once"), PAYLOAD, "abc.job.failed"])  # another event id is sent
        assert sum(r.path == "/once" for r in receiver.received) == 2
