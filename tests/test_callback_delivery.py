"""The callback task's outcomes for hosts it cannot resolve or may not reach (run eagerly, no broker)."""

from __future__ import annotations

import socket

import pytest
from helpers import PUBLIC, ScriptedResolver, WebhookReceiver

from varco.tasks.celery_app import create_app
from varco.tasks.settings import Settings
from varco.workers import metrics
from varco.workers.callbacks import register_callback_task

PAYLOAD = {"type": "job.succeeded", "job_id": "abc", "state": "succeeded"}


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
