"""Webhook events queued together: concurrent `send_event`s from a worker's task threads go out as one
`varco.callback.batch` message, and the callback side delivers each event of it once, retries a failed
one alone, and skips on redelivery what it delivered already. Real Redis (broker and delivered log), a
real receiver; the callback worker is played by `run_queued` (each message as the worker would run it).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from helpers import WebhookReceiver

from varco.tasks import tracing
from varco.tasks.celery_app import (
    CALLBACK_BATCH_QUEUE,
    CALLBACK_BATCH_TASK,
    CALLBACK_QUEUE,
    CALLBACK_TASK,
    create_app,
    queue_depth,
)
from varco.tasks.connections import redis_from_url
from varco.tasks.settings import Settings
from varco.tasks.signing import verify
from varco.workers.devtools.local_redis import start_redis
from varco.workers.output import webhooks
from varco.workers.output.webhook_delivery import DeliveredLog, register_callback_task
from varco.workers.output.webhooks import WebhookItem, send_event

SECRET = "whsec_" + base64.b64encode(b"batch-receiver-key").decode()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.close()


@pytest.fixture
def apps(module_redis, flushed_redis) -> tuple[Celery, Celery, DeliveredLog]:
    """The worker's app, the callback process's app (its tasks registered) and its delivered log."""
    settings = Settings(
        broker_url=module_redis.url, allow_private_urls=True, callback_secret=SECRET, callback_max_retries=3,
        _env_file=None,
    )  # fmt: skip
    log = DeliveredLog(redis_from_url(module_redis.url), ttl=60)
    callbacks = create_app(settings)
    register_callback_task(callbacks, settings, log)
    return create_app(settings), callbacks, log


def run_queued(callbacks: Celery) -> list[dict[str, Any]]:
    """Take every message on the callback queues and run it as the callback worker would (its arguments,
    headers and retry count); what it publishes meanwhile waits for the next call. Returns the messages."""
    taken = []
    with callbacks.connection_for_read() as conn:
        for name in (CALLBACK_QUEUE, CALLBACK_BATCH_QUEUE):
            with conn.SimpleQueue(name, no_ack=True) as simple:
                # As many as the queue holds now: a short `get` timeout can miss a queue kombu's poller has
                # not picked up yet.
                for _ in range(queue_depth(redis_from_url(callbacks.conf.broker_url), name)):
                    message = simple.get(timeout=10)
                    taken.append({"headers": message.headers, "payload": message.payload})
    for m in taken:
        args, kwargs, _ = m["payload"]
        task = callbacks.tasks[m["headers"]["task"]]
        task.apply(args=args, kwargs=kwargs, headers=m["headers"], retries=m["headers"].get("retries") or 0)
    return taken


def event(job_id: str, type_: str = "job.succeeded") -> dict[str, Any]:
    return {"type": type_, "job_id": job_id, "state": "succeeded"}


def item(receiver: WebhookReceiver, path: str, job_id: str) -> dict[str, Any]:
    payload = event(job_id)
    return WebhookItem(url=receiver.url(path), payload=payload, msg_id=f"{job_id}.job.succeeded").model_dump()


def posts(receiver: WebhookReceiver, path: str) -> list[Any]:
    return [r for r in receiver.received if r.path == path]


def test_concurrent_events_go_out_in_fewer_messages_and_each_is_delivered_once_signed(
    apps: tuple[Celery, Celery, DeliveredLog], receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, callbacks, _ = apps
    group = webhooks._group(worker)
    threads_n = 12
    # The first publish is held until every other thread has queued its event behind it, as task threads
    # that end together do on a loaded worker (without the hold, how many overlap depends on timing).
    real_send = worker.send_task
    first = threading.Event()

    def held_send(*args: Any, **kwargs: Any) -> Any:
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + 10
            while len(group._pending) < threads_n - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        return real_send(*args, **kwargs)

    monkeypatch.setattr(worker, "send_task", held_send)
    monkeypatch.setattr(group, "_linger_s", 0.0)  # the hold, not the linger, makes the overlap here
    jobs = [f"job{n}" for n in range(threads_n)]
    senders = [
        threading.Thread(target=send_event, args=(worker, receiver.url(f"/many/{job}"), event(job))) for job in jobs
    ]
    for t in senders:
        t.start()
    for t in senders:
        t.join(30)
    messages = run_queued(callbacks)
    assert 1 < len(messages) < threads_n  # a lone first one, then one batch (at most MAX_BATCH per message)
    assert {m["headers"]["task"] for m in messages} == {CALLBACK_TASK, CALLBACK_BATCH_TASK}
    got = [r for r in receiver.received if r.path.startswith("/many/")]
    assert sorted(r.headers["webhook-id"] for r in got) == sorted(f"{job}.job.succeeded" for job in jobs)
    for r in got:  # each signed with the secret, its body the event of its own job
        assert verify(SECRET, r.headers, r.body) == event(r.path.rsplit("/", 1)[1])
    assert run_queued(callbacks) == []  # nothing left over, nothing put back


def test_an_event_whose_receiver_fails_is_retried_alone_and_delivered_later(
    apps: tuple[Celery, Celery, DeliveredLog], receiver: WebhookReceiver
) -> None:
    worker, callbacks, log = apps
    answers = iter([503])
    receiver.status_for = lambda p: next(answers, 204) if p == "/flaky" else 204
    batch = [item(receiver, "/ok", "a"), item(receiver, "/flaky", "b"), item(receiver, "/ok", "c")]
    worker.send_task(CALLBACK_BATCH_TASK, args=[batch], queue=CALLBACK_QUEUE)
    (first,) = run_queued(callbacks)
    assert first["headers"]["task"] == CALLBACK_BATCH_TASK
    assert (len(posts(receiver, "/ok")), len(posts(receiver, "/flaky"))) == (2, 1)
    assert log.seen_many(["a.job.succeeded", "b.job.succeeded", "c.job.succeeded"]) == [True, False, True]
    # The failed one is back on the queue alone, as the single task's first retry: retry count 1, a countdown.
    (retry,) = run_queued(callbacks)
    assert retry["headers"]["task"] == CALLBACK_TASK and retry["headers"]["retries"] == 1
    assert retry["headers"]["eta"] is not None
    assert retry["payload"][0] == [receiver.url("/flaky"), event("b"), "b.job.succeeded"]
    assert (len(posts(receiver, "/ok")), len(posts(receiver, "/flaky"))) == (2, 2)
    assert {json.loads(r.body)["job_id"] for r in posts(receiver, "/flaky")} == {"b"}
    assert log.seen("b.job.succeeded") and run_queued(callbacks) == []


def test_a_redelivered_batch_sends_only_the_events_not_delivered_yet(
    apps: tuple[Celery, Celery, DeliveredLog], receiver: WebhookReceiver
) -> None:
    """The callback worker died mid-batch after delivering some events: the batch message comes back
    (its ack never went) and the events marked delivered are not POSTed again."""
    worker, callbacks, log = apps
    batch = [item(receiver, "/again", job) for job in ("x", "y", "z")]
    log.mark_many(["x.job.succeeded", "z.job.succeeded"])  # delivered before the worker died
    worker.send_task(CALLBACK_BATCH_TASK, args=[batch], queue=CALLBACK_QUEUE)
    run_queued(callbacks)
    assert [r.headers["webhook-id"] for r in posts(receiver, "/again")] == ["y.job.succeeded"]
    worker.send_task(CALLBACK_BATCH_TASK, args=[batch], queue=CALLBACK_QUEUE)  # and once more: nothing left
    run_queued(callbacks)
    assert len(posts(receiver, "/again")) == 1


def test_each_event_of_a_batch_continues_its_own_jobs_trace(receiver: WebhookReceiver, spans) -> None:
    settings = Settings(broker_url="memory://", allow_private_urls=True, _env_file=None)
    app = create_app(settings)
    register_callback_task(app, settings)
    carriers, span_ids = [], []
    for _ in ("t1", "t2"):
        with tracing.span("varco.job", kind="consumer") as job_span:
            carriers.append(tracing.inject())
        span_ids.append(job_span.get_span_context().span_id)
    batch = [
        item(receiver, f"/traced/{job}", job) | {"trace": c} for job, c in zip(("t1", "t2"), carriers, strict=True)
    ]
    app.tasks[CALLBACK_BATCH_TASK].apply(args=[batch])
    by_job = {s.attributes["varco.job_id"]: s for s in spans.get_finished_spans() if s.name == "POST"}
    assert {job: s.parent.span_id for job, s in by_job.items()} == dict(zip(("t1", "t2"), span_ids, strict=True))
    for job in ("t1", "t2"):  # the POST names its own attempt's span
        (post,) = posts(receiver, f"/traced/{job}")
        assert post.headers["traceparent"].split("-")[2] == format(by_job[job].context.span_id, "016x")


def test_events_queued_together_through_a_broker_outage_all_get_out(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    port = server.port
    app = create_app(Settings(broker_url=server.url, _env_file=None))
    server.stop()  # Redis is away when the jobs finish
    senders = [
        threading.Thread(target=send_event, args=(app, "https://hooks.example.com/x", event(f"j{n}"))) for n in range(6)
    ]
    for t in senders:
        t.start()
    time.sleep(2.0)
    assert all(t.is_alive() for t in senders), "a send_event returned while Redis was down"
    restarted = start_redis(tmp_path, port=port)
    try:
        for t in senders:
            t.join(60)
        assert not any(t.is_alive() for t in senders)
        ids = []
        with app.connection_for_read() as conn:
            for name in (CALLBACK_QUEUE, CALLBACK_BATCH_QUEUE):
                with conn.SimpleQueue(name, no_ack=True) as simple:
                    while queue_depth(redis_from_url(restarted.url), name):
                        message = simple.get(timeout=10)
                        args = message.payload[0]
                        batch = message.headers["task"] == CALLBACK_BATCH_TASK
                        ids += [i["msg_id"] for i in args[0]] if batch else [args[2]]
        assert sorted(ids) == sorted(f"j{n}.job.succeeded" for n in range(6))
    finally:
        restarted.stop()


def test_a_slow_receiver_holds_a_batch_for_one_attempt_then_the_rest_is_put_back(
    module_redis, flushed_redis, receiver: WebhookReceiver
) -> None:
    """A batch's events to a receiver that does not answer in time: the first attempt is cut at the
    timeout and retried alone; the batch starts no more after it, and puts the others back untried."""
    settings = Settings(
        broker_url=module_redis.url, allow_private_urls=True, callback_timeout_s=0.5, callback_host_concurrency=1,
        callback_max_retries=3, _env_file=None,
    )  # fmt: skip
    callbacks = create_app(settings)
    register_callback_task(callbacks, settings, DeliveredLog(redis_from_url(module_redis.url), ttl=60))
    receiver.status_for = lambda p: time.sleep(1.5) or 204
    batch = [item(receiver, "/slow", job) for job in ("s1", "s2", "s3")]
    started = time.monotonic()
    callbacks.tasks[CALLBACK_BATCH_TASK].apply(args=[batch])
    assert time.monotonic() - started < 1.4  # one attempt's timeout, not three
    with callbacks.connection_for_read() as conn:
        simple = conn.SimpleQueue(CALLBACK_QUEUE, no_ack=True)
        back = [simple.get(timeout=5) for _ in range(3)]
    assert sorted((m.payload[0][2], m.headers["retries"]) for m in back) == [
        ("s1.job.succeeded", 1), ("s2.job.succeeded", 0), ("s3.job.succeeded", 0)
    ]  # fmt: skip
    assert all(m.headers["task"] == CALLBACK_TASK and m.headers["eta"] for m in back)
