"""RabbitMQ's Celery configuration (tasks/brokers.py) and the status Redis it needs (VARCO_STATUS_URL)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from varco.tasks.brokers import DELIVERY_LIMIT, is_amqp
from varco.tasks.celery_app import CALLBACK_BATCH_QUEUE, CALLBACK_QUEUE, INFER_QUEUE, create_app
from varco.tasks.keys import DEAD_LETTER_QUEUE
from varco.tasks.settings import Settings

RABBIT = "amqp://guest:guest@127.0.0.1:5673//"
STATUS = "redis://127.0.0.1:6390/0"


@pytest.mark.parametrize(
    ("url", "amqp"),
    [
        (RABBIT, True),
        ("amqps://u:p@mq.example.com:5671/varco", True),
        ("amqp://a//;amqp://b//;amqp://c//", True),  # Celery's failover list
        ("redis://127.0.0.1:6379/0", False),
        ("sentinel://h1:26379/0;sentinel://h2:26379/0", False),
        ("amqp://a//;redis://b/0", False),
    ],
)
def test_which_urls_name_rabbitmq(url: str, amqp: bool) -> None:
    assert is_amqp(url) is amqp


def test_a_rabbitmq_broker_needs_a_status_redis() -> None:
    with pytest.raises(ValidationError, match="VARCO_STATUS_URL"):
        Settings(broker_url=RABBIT, _env_file=None)
    with pytest.raises(ValidationError, match="not RabbitMQ"):
        Settings(broker_url=RABBIT, status_url=RABBIT, _env_file=None)
    assert Settings(broker_url=RABBIT, status_url=STATUS).status_redis_url == STATUS
    assert Settings(broker_url=STATUS).status_redis_url == STATUS  # Redis broker: the same Redis by default


def test_rabbitmq_queues_are_quorum_queues_with_a_delivery_limit_and_confirms() -> None:
    settings = Settings(broker_url=RABBIT, status_url=STATUS, task_routes={"ocr": "varco.ocr"})
    conf = create_app(settings).conf
    queues = {q.name: q for q in conf.task_queues}
    assert set(queues) == {INFER_QUEUE, "varco.ocr", CALLBACK_QUEUE, CALLBACK_BATCH_QUEUE}
    for queue in queues.values():
        assert queue.durable and queue.exchange.type == "topic"  # native delayed delivery needs a topic exchange
        assert queue.queue_arguments == {
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": DEAD_LETTER_QUEUE,
        }
        assert queue.max_priority is None  # quorum queues in 3.10 have no priorities: the fair queue orders jobs
    assert conf.broker_transport_options == {"confirm_publish": True}  # none of the Redis transport's options
    assert conf.broker_channel_error_retry and not conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1


def test_a_redis_broker_keeps_its_lists() -> None:
    conf = create_app(Settings(broker_url=STATUS)).conf
    assert all(not q.queue_arguments for q in conf.task_queues)
    assert conf.broker_transport_options["visibility_timeout"] == Settings().visibility_timeout


def test_on_rabbitmq_task_events_go_without_the_confirms_jobs_keep() -> None:
    # A confirmed event publish reads the worker's event connection, which its consumer thread reads too
    # (tasks/brokers.UnconfirmedEventDispatcher): the worker's event connection must publish without confirms.
    app = create_app(Settings(broker_url=RABBIT, status_url=STATUS))
    events_connection = app.connection_for_write()
    app.events.Dispatcher(events_connection, enabled=False)  # as the worker's Events step builds it
    assert events_connection.transport_options["confirm_publish"] is False
    assert app.connection_for_write().transport_options["confirm_publish"] is True  # jobs and webhooks
    assert app.pool.connection.transport_options["confirm_publish"] is True  # the task-sent event's producer
    redis_app = create_app(Settings(broker_url=STATUS))
    redis_connection = redis_app.connection_for_write()
    redis_app.events.Dispatcher(redis_connection, enabled=False)
    assert "confirm_publish" not in redis_connection.transport_options
