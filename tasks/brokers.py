"""Which broker a URL names, and the Celery configuration RabbitMQ gets (docs/brokers.md).

On Redis, Celery's queues are kombu lists (tasks/celery_app.py). On RabbitMQ (`amqp://`, `amqps://`, or
failover lists `amqp://a;amqp://b`), the job and webhook queues are quorum queues: replicated, declared
by whoever publishes or consumes first (a job submitted before any worker started is kept), with
publisher confirms, a delivery limit that dead-letters a message delivered too often, and countdowns
(job and webhook retries) through Celery's native delayed delivery, which works on quorum queues.
Status records, events, leases and the fair queue stay on Redis (`Settings.status_redis_url`).
"""

from __future__ import annotations

import threading
from typing import Any

import amqp.exceptions
from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher
from kombu import Exchange, Queue
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from varco.tasks.keys import DEAD_LETTER_QUEUE

# What reading from RabbitMQ raises when it is down or refuses (with OSError).
BROKER_ERRORS: tuple[type[Exception], ...] = (OperationalError, amqp.exceptions.AMQPError)
NOT_FOUND = 404  # AMQP reply code of a passive declare of a queue that does not exist
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
# Deliveries of one message before RabbitMQ dead-letters it. A message is delivered again only when the
# worker holding it died or lost its channel; the lifecycle fails a job on its VARCO_MAX_ATTEMPTS + 1st
# delivery (PoisonMessageError), so the limit only catches what never reaches the lifecycle. It is a queue
# argument, fixed at the queue's declaration: one value for every process, whatever its settings.
DELIVERY_LIMIT = 10


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def is_amqp(url: str) -> bool:
    """Whether a broker URL (or each part of a `;` failover list) names RabbitMQ."""
    parts = [part.strip() for part in url.split(";") if part.strip()]
    return bool(parts) and all(scheme(part) in AMQP_SCHEMES for part in parts)


def quorum_queue(name: str) -> Queue:
    """A durable quorum queue on a topic exchange of its own name (native delayed delivery needs a
    non-direct exchange), dead-lettering to DEAD_LETTER_QUEUE after DELIVERY_LIMIT deliveries. No
    x-max-priority: quorum queues have no priorities in 3.10 (the fair queue orders jobs instead)."""
    return Queue(
        name,
        Exchange(name, type="topic", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": DEAD_LETTER_QUEUE,
        },
    )


def dead_letter_queue() -> Queue:
    """Where poison messages go (a quorum queue nobody consumes): inspect it, or move messages back."""
    return Queue(DEAD_LETTER_QUEUE, Exchange(""), routing_key=DEAD_LETTER_QUEUE, durable=True,
                 queue_arguments={"x-queue-type": "quorum"})  # fmt: skip


def declare_queues(connection: Connection, queues: list[Queue]) -> None:
    """Declare the dead-letter queue and every queue of the app (workers do at start): only a delivery can
    dead-letter a message, and native delayed delivery binds every app queue, the webhook queue of a node
    without callbacks too. Raises what kombu raises when the broker cannot be reached after a few tries."""
    with connection:
        connection.ensure_connection(max_retries=3)
        with connection.channel() as channel:
            for queue in [dead_letter_queue(), *queues]:
                queue(channel).declare()


class AmqpQueueDepth:
    """Messages ready on a RabbitMQ queue (a passive declare's count; a queue not declared yet holds none).
    One connection, opened on first use and again after an error, used by one thread at a time."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._lock = threading.Lock()

    def __call__(self, queue: str) -> int:
        with self._lock:
            return self._ready(queue)

    def _ready(self, queue: str) -> int:
        try:
            _, ready, _ = self.connection.default_channel.queue_declare(queue, passive=True)
        except self.connection.channel_errors as exc:
            if getattr(exc, "code", None) == NOT_FOUND:
                return 0
            raise
        except self.connection.connection_errors:
            self.connection.close()  # the next call connects again
            raise
        return int(ready)


class UnconfirmedEventDispatcher(EventDispatcher):
    """Task events published without publisher confirms; jobs and webhooks keep them (`amqp_conf`).

    Why: a confirmed publish waits for the broker's ack by reading the connection, and a worker's event
    connection is also read by its consumer thread (Celery registers it with the event loop for heartbeats)
    while task threads flush events on it: two threads reading one socket. One took the other's ack, or half
    a frame, and the worker stalled (its consumer blocked on the dispatcher's lock for a minute and more:
    seen on RabbitMQ with task events watched, many revoked queued jobs and jobs running). Events are
    best-effort telemetry for Flower and `celery events`; without confirms their publish only writes.
    Only a connection given to the dispatcher is changed (the worker's own event connection): the task-sent
    event goes through the task's producer, whose confirm stays."""

    def __init__(self, connection: Connection | None = None, *args: Any, **kwargs: Any) -> None:
        if connection is not None:
            connection.transport_options = {**connection.transport_options, "confirm_publish": False}
            if connection.connected:  # already open (the worker's is): channels made from now on
                connection.connection.confirm_publish = False
        super().__init__(connection, *args, **kwargs)


class UnconfirmedEvents(Events):
    """`app.events` on RabbitMQ: its Dispatcher publishes without confirms (UnconfirmedEventDispatcher)."""

    dispatcher_cls = UnconfirmedEventDispatcher


def amqp_conf(queues: list[str]) -> dict[str, Any]:
    """Celery settings for RabbitMQ, laid over the common ones in `create_app`."""
    return {
        "task_queues": [quorum_queue(name) for name in queues],
        "task_default_exchange_type": "topic",
        "task_default_queue_type": "quorum",
        "task_create_missing_queue_type": "quorum",
        "task_create_missing_queue_exchange_type": "topic",
        # Quorum queues refuse a global prefetch: per-consumer QoS, and native delayed delivery for
        # countdowns (a worker holding an ETA message would otherwise keep it unacked for the whole wait).
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
        # Each publish waits for the broker's confirm; a refused or unconfirmed one raises and Celery's publish
        # retry (tasks/connections.PUBLISH_RETRY_POLICY) tries again (celery#9149: without confirms, a message
        # published on a closed channel is lost without an error).
        "broker_transport_options": {"confirm_publish": True},
        # RabbitMQ closes a channel that holds a message unacked past its consumer_timeout (30 min by default):
        # the consumer reconnects instead of the worker dying of it, and the task that outlived the timeout
        # runs on (its ack then fails; the message, delivered again, finds the run's live lease and waits).
        "broker_channel_error_retry": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A failover list: the next URL after a lost connection, in order.
        "broker_failover_strategy": "round-robin",
        "task_default_priority": None,
    }
