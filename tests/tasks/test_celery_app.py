from __future__ import annotations

import pytest
from kombu.exceptions import ContentDisallowed

from varco.tasks.celery_app import (
    CALLBACK_BATCH_QUEUE,
    CALLBACK_BATCH_TASK,
    CALLBACK_QUEUE,
    CALLBACK_TASK,
    INFER_QUEUE,
    broker_priority,
    create_app,
    infer_queue,
)
from varco.tasks.settings import Settings


def test_json_only_late_acks_and_visibility_timeout() -> None:
    app = create_app(Settings(visibility_timeout=7200, broker_url="redis://127.0.0.1:1/0"))
    conf = app.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 7200
    assert {q.name for q in conf.task_queues} == {INFER_QUEUE, CALLBACK_QUEUE, CALLBACK_BATCH_QUEUE}
    assert conf.task_routes[CALLBACK_TASK] == {"queue": CALLBACK_QUEUE}
    # Batches never reach the queue an older callback process reads: it would drop the task it does not know.
    assert conf.task_routes[CALLBACK_BATCH_TASK] == {"queue": CALLBACK_BATCH_QUEUE} != {"queue": CALLBACK_QUEUE}


def test_pickle_is_refused_by_the_apps_both_sides_build() -> None:
    """The app producers and workers build (create_app) decodes JSON messages and refuses pickle ones."""
    import json
    import pickle

    from kombu.serialization import loads, prepare_accept_content

    app = create_app(Settings(broker_url="memory://", _env_file=None))
    accept = prepare_accept_content(app.conf.accept_content)  # what Celery's consumer hands kombu
    assert loads(json.dumps({"ok": 1}), "application/json", "utf-8", accept=accept) == {"ok": 1}
    with pytest.raises(ContentDisallowed):
        loads(pickle.dumps({"evil": True}), "application/x-python-serialize", "binary", accept=accept)
    # What a worker's consumer is given: Celery passes the app's accept_content on to kombu.
    with app.connection_for_read() as connection:
        consumer = app.amqp.TaskConsumer(connection, queues=[app.amqp.queues[INFER_QUEUE]])
        assert set(consumer.accept) == {"application/json"}


def test_priority_and_routing() -> None:
    assert broker_priority(9) == 0 and broker_priority(0) == 9  # Redis serves lane 0 first
    assert broker_priority(None) == broker_priority(4)
    assert infer_queue("ocr", {"ocr": "varco.ocr"}) == "varco.ocr"
    assert infer_queue("caption", {"ocr": "varco.ocr"}) == INFER_QUEUE


def test_published_task_reprs_are_redacted_but_the_arguments_are_not(tmp_path) -> None:
    """`celery inspect active` and Flower show a message's argsrepr/kwargsrepr headers: read from Redis,
    they carry no URL secret, while the arguments the task runs with are whole."""
    from varco.tasks.fair_queue import send_ticket
    from varco.workers.devtools.local_redis import start_redis
    from varco.workers.output.webhooks import send_event

    hook = "https://bob:H00kPassw0rd@hooks.example.com/in?token=t0k"
    image = "https://bucket.s3.amazonaws.com/a.png?X-Amz-Signature=" + "s1g" * 400  # longer than a repr keeps
    payload = {"type": "job.failed", "job_id": "abc", "metadata": {"source": image}}
    with start_redis(tmp_path) as server:
        app = create_app(Settings(broker_url=server.url, _env_file=None))
        send_event(app, hook, payload)
        app.send_task("varco.infer", args=["abc", {"image_uri": image}], kwargs={"note": hook}, queue=INFER_QUEUE)
        send_ticket(app, INFER_QUEUE, "b" * 32)
        with app.connection_for_read() as conn:
            webhook = conn.SimpleQueue(CALLBACK_QUEUE, no_ack=True).get(timeout=10)
            jobs = conn.SimpleQueue(INFER_QUEUE, no_ack=True)
            messages = [jobs.get(timeout=10), jobs.get(timeout=10)]
    reprs = [m.headers["argsrepr"] + m.headers["kwargsrepr"] for m in (webhook, *messages)]
    assert "https://[redacted]@hooks.example.com/in?[redacted]" in reprs[0] + reprs[1]
    assert "a.png?[redacted]" in reprs[0] + reprs[1] + reprs[2]
    for leaked in ("H00kPassw0rd", "t0k", "s1g"):
        assert not any(leaked in r for r in reprs), leaked
    assert webhook.payload[0] == [hook, payload, "abc.job.failed"]  # the callback still gets its URL
