"""Webhook delivery's retry policy, address rule and DNS outcomes, against a real local receiver.

The delivery task runs eagerly (Celery's `apply`): a retry reruns it at once, in this thread, so
every attempt has happened when `apply` returns and the receiver's count is final. Backoff between
attempts is the worker's business; here only which answers are retried matters.
"""

from __future__ import annotations

import base64
import logging
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PUBLIC, ScriptedResolver, WebhookReceiver

from varco.tasks.celery_app import create_app
from varco.tasks.connections import redis_from_url
from varco.tasks.requests import JobRequest
from varco.tasks.schemas import ErrorInfo, JobState
from varco.tasks.settings import Settings
from varco.tasks.signing import verify
from varco.workers import metrics
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.net.retry import backoff_s
from varco.workers.output.webhook_delivery import DeliveredLog, delivery_outcome, register_callback_task
from varco.workers.output.webhooks import event_payload, terminal_event

PAYLOAD = {"type": "job.succeeded", "job_id": "abc", "state": "succeeded"}
RETRIES = 2
SECRET = "whsec_" + base64.b64encode(b"receiver-shared-key").decode()


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


@pytest.mark.parametrize(
    ("statuses", "outcome"),
    [
        ((200, 201, 204, 299), "delivered"),
        ((408, 425, 429, 500, 502, 503, 504, 599), "retry"),
        ((300, 302, 399, 400, 401, 403, 404, 409, 410, 422, 499), "rejected"),
    ],
)
def test_which_answers_are_retried(statuses: tuple[int, ...], outcome: str) -> None:
    """The outcome is also the `varco_callbacks_total` label that dashboards count."""
    assert {status: delivery_outcome(status) for status in statuses} == dict.fromkeys(statuses, outcome)


@pytest.mark.parametrize("status", [408, 425, 429, 500, 503])
def test_408_425_429_and_5xx_are_retried_until_the_retries_run_out(receiver: WebhookReceiver, status: int) -> None:
    path = f"/retry/{status}"
    receiver.status_for = lambda p: status if p == path else 204
    assert deliver(receiver, path) == 1 + RETRIES


@pytest.mark.parametrize("status", [302, 400, 401, 403, 404, 410, 422])
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
    from varco.workers.devtools.local_redis import start_redis
    from varco.workers.output.webhook_delivery import DeliveredLog

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


@pytest.mark.parametrize(("jitter", "share"), [("least", 0.5), ("most", 1.0)])
def test_backoff_doubles_from_a_second_up_to_ten_minutes(
    monkeypatch: pytest.MonkeyPatch, jitter: str, share: float
) -> None:
    """Each retry waits between half and all of 1, 2, 4, ... seconds, never more than 600."""
    monkeypatch.setattr(random, "uniform", lambda low, high: low if jitter == "least" else high)
    assert [backoff_s(n) for n in range(12)] == [share * min(2**n, 600) for n in range(12)]


def test_webhooks_are_signed_with_the_callback_secret(
    receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(broker_url="memory://", allow_private_urls=True, callback_secret=SECRET, _env_file=None)
    with caplog.at_level(logging.WARNING):
        task = register_callback_task(create_app(settings), settings)
    assert "VARCO_CALLBACK_SECRET" not in caplog.text
    task.apply(args=[receiver.url("/signed"), PAYLOAD, "abc.job.succeeded"])
    (post,) = [r for r in receiver.received if r.path == "/signed"]
    assert verify(SECRET, post.headers, post.body) == PAYLOAD


def test_without_a_secret_webhooks_go_unsigned_and_say_so(
    receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(broker_url="memory://", allow_private_urls=True, _env_file=None)
    with caplog.at_level(logging.WARNING):
        task = register_callback_task(create_app(settings), settings)
    assert caplog.messages == ["VARCO_CALLBACK_SECRET is not set: webhooks are sent unsigned"]
    task.apply(args=[receiver.url("/unsigned"), PAYLOAD, "abc.job.succeeded"])
    (post,) = [r for r in receiver.received if r.path == "/unsigned"]
    headers = {k.lower(): v for k, v in post.headers.items()}
    assert headers["webhook-id"] == "abc.job.succeeded" and "webhook-signature" not in headers


def test_the_delivered_log_remembers_an_id_for_its_ttl(tmp_path: Path) -> None:
    with start_redis(tmp_path) as server:
        client = redis_from_url(server.url)
        log = DeliveredLog(client, ttl=60)
        assert not log.seen("abc.job.succeeded")
        log.mark("abc.job.succeeded")
        assert log.seen("abc.job.succeeded") and not log.seen("abc.job.failed")
        # Under varco: with the other keys, and it expires: the log does not grow forever.
        assert 0 < client.ttl("varco:webhook-delivered:abc.job.succeeded") <= 60


def test_a_delivered_log_without_redis_never_stops_a_delivery(
    receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis away: the webhook is sent (at least once; receivers deduplicate on webhook-id) and the lost
    record is logged, never raised into the delivery."""
    log = DeliveredLog(redis_from_url(f"redis://127.0.0.1:{free_port()}/0", retries=0), ttl=60)
    assert not log.seen("abc.job.succeeded")
    with caplog.at_level(logging.WARNING):
        log.mark("abc.job.succeeded")
    assert caplog.messages == [
        "could not record webhook abc.job.succeeded as delivered; a redelivery may send it again"
    ]
    settings = Settings(broker_url="memory://", allow_private_urls=True, _env_file=None)
    task = register_callback_task(create_app(settings), settings, log)
    task.apply(args=[receiver.url("/no-redis"), PAYLOAD, "abc.job.succeeded"])
    assert sum(r.path == "/no-redis" for r in receiver.received) == 1


def test_event_payload_is_the_webhook_body() -> None:
    request = JobRequest(image_uri="https://images.example.com/cat.png", task="caption", metadata={"order": 7})
    ts = "2026-12-01T02:00:00Z"
    succeeded = event_payload("job.succeeded", "j1", request, JobState.SUCCEEDED, ts, result_uri="s3://b/j1.json")
    assert succeeded == {
        "type": "job.succeeded",
        "job_id": "j1",
        "task": "caption",
        "state": "succeeded",
        "result_uri": "s3://b/j1.json",
        "error": None,
        "metadata": {"order": 7},
        "tenant": "default",
        "timestamp": ts,
    }
    assert type(succeeded["state"]) is str  # JSON-ready: the plain value, not the JobState member
    error = ErrorInfo(type="ImageFetchError", message="HTTP 404 for the image")
    failed = event_payload("job.failed", "j1", request, JobState.FAILED, ts, error=error)
    assert failed == succeeded | {
        "type": "job.failed",
        "state": "failed",
        "result_uri": None,
        "error": {"type": "ImageFetchError", "message": "HTTP 404 for the image"},
    }


def test_a_cancelled_job_has_its_own_terminal_event() -> None:
    request = JobRequest(
        image_uri="https://images.example.com/cat.png", task="caption", callback_events=("job.cancelled",)
    )
    ts = "2026-12-01T02:00:00Z"
    body = event_payload(terminal_event(JobState.CANCELLED), "j1", request, JobState.CANCELLED, ts)
    assert (body["type"], body["state"], body["result_uri"], body["error"]) == (
        "job.cancelled",
        "cancelled",
        None,
        None,
    )
    assert [terminal_event(s) for s in JobState] == [
        None, None, None, "job.succeeded", "job.failed", "job.cancelled"
    ]  # fmt: skip


def test_each_attempt_is_a_new_span_in_the_jobs_trace_and_its_post_carries_it(receiver: WebhookReceiver, spans) -> None:
    """The callback message carries the job span's traceparent; a retried delivery is one more span, a
    sibling in the same trace, and each POST names its own attempt's span."""
    from varco.tasks import tracing

    path = "/traced"
    answers = iter([503, 204])
    receiver.status_for = lambda p: next(answers) if p == path else 204
    settings = Settings(broker_url="memory://", allow_private_urls=True, callback_max_retries=RETRIES, _env_file=None)
    task = register_callback_task(create_app(settings), settings)
    with tracing.span("varco.job", kind="consumer") as job:
        headers = tracing.inject()  # what webhooks.py puts on the callback message
    task.apply(args=[receiver.url(path), PAYLOAD, "abc.job.succeeded"], headers=headers)
    posts = [s for s in spans.get_finished_spans() if s.name == "POST"]
    trace_id = job.get_span_context().trace_id
    assert len(posts) == 2 and len({s.context.span_id for s in posts}) == 2
    job_span = job.get_span_context().span_id
    assert [(s.context.trace_id, s.parent.span_id) for s in posts] == [(trace_id, job_span)] * 2
    assert [s.attributes.get("http.request.resend_count") for s in posts] == [None, 1]
    assert [s.attributes["http.response.status_code"] for s in posts] == [503, 204]
    assert all(s.kind.name == "CLIENT" and s.attributes["url.full"] == receiver.url(path) for s in posts)
    sent = [r.headers["traceparent"].split("-")[1:3] for r in receiver.received if r.path == path]
    assert sent == [[format(trace_id, "032x"), format(s.context.span_id, "016x")] for s in posts]
