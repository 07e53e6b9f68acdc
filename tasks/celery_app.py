"""The Celery app both sides build from Settings: JSON only, late acks, two queues, tasks by name.

`app` (also `celery`) is a module-level app built from the environment on first use, so Celery's own
tools work: `celery -A varco.tasks.celery_app inspect ping|active|stats|active_queues`, `celery
events`, Flower. Workers are started with `varco worker`, which registers the tasks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.app.amqp import AMQP
from celery.utils.saferepr import saferepr
from kombu import Queue

from varco.tasks import redis_transport
from varco.tasks.brokers import (
    BROKER_ERRORS,
    AmqpQueueDepth,
    UnconfirmedEvents,
    amqp_conf,
    declare_queues,
    is_amqp,
)
from varco.tasks.connections import PUBLISH_RETRY_POLICY, broker_transport_options
from varco.tasks.keys import CALLBACK_BATCH_QUEUE, CALLBACK_QUEUE, DEAD_LETTER_QUEUE, INFER_QUEUE, queue_lane
from varco.tasks.prompts import TaskType
from varco.tasks.redaction import redact_value
from varco.tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)
INFER_TASK = "varco.infer"
CALLBACK_TASK = "varco.callback"
# Many webhook events in one message: what a worker's task threads queue together (output/webhooks.py).
CALLBACK_BATCH_TASK = "varco.callback.batch"
# Redis lists per priority; kombu consumes lane 0 first, so API priority p (higher = sooner) maps to 9 - p.
PRIORITY_STEPS = list(range(10))
UNACKED_MUTEX_EXPIRE_S = 15
DEFAULT_PRIORITY = 4


def broker_priority(priority: int | None) -> int:
    return 9 - (DEFAULT_PRIORITY if priority is None else priority)


def infer_queue(task: TaskType | str, routes: dict[str, str] | None = None) -> str:
    """Queue for an inference job: `varco` unless VARCO_TASK_ROUTES sends this task type elsewhere."""
    return (routes or {}).get(str(task), INFER_QUEUE)


class RedactingAMQP(AMQP):
    """Every task message this app publishes (a ticket, a webhook, a retry, a put-back) carries its
    `argsrepr`/`kwargsrepr` redacted (tasks/redaction.py): `celery inspect active`, Flower and task
    events show them, and a callback URL's password or `?token=` must not be there. The arguments
    themselves are the task's input and go unchanged.

    Its `Connection` (every connection Celery opens goes through it) gives Redis URLs the transport of
    tasks/redis_transport.py: one Redis command per delivery and one per ack; RabbitMQ's is kombu's."""

    Connection = redis_transport.Connection

    def as_task_v2(
        self, task_id: str, name: str, args: Any = None, kwargs: Any = None, *rest: Any,
        argsrepr: str | None = None, kwargsrepr: str | None = None, **options: Any,
    ) -> Any:  # fmt: skip
        levels = self.app.conf.task_repr_maxlevels
        if argsrepr is None:
            argsrepr = saferepr(redact_value(args or ()), self.argsrepr_maxsize, maxlevels=levels)
        if kwargsrepr is None:
            kwargsrepr = saferepr(redact_value(kwargs or {}), self.kwargsrepr_maxsize, maxlevels=levels)
        return super().as_task_v2(
            task_id, name, args, kwargs, *rest, argsrepr=argsrepr, kwargsrepr=kwargsrepr, **options
        )


def create_app(settings: Settings) -> Celery:
    amqp = is_amqp(settings.broker_url)
    # On RabbitMQ, task events go without the publisher confirms jobs and webhooks have (UnconfirmedEvents).
    events = UnconfirmedEvents if amqp else None
    app = Celery("varco", broker=settings.broker_url, set_as_current=False, amqp=RedactingAMQP, events=events)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # pickle refused
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # status lives in our own Redis records, results in the store
        result_expires=settings.status_ttl,
        task_default_queue=INFER_QUEUE,
        task_queues=[Queue(INFER_QUEUE), Queue(CALLBACK_QUEUE), Queue(CALLBACK_BATCH_QUEUE)],
        task_routes={CALLBACK_TASK: {"queue": CALLBACK_QUEUE}, CALLBACK_BATCH_TASK: {"queue": CALLBACK_BATCH_QUEUE}},
        task_default_priority=broker_priority(None),
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "priority_steps": PRIORITY_STEPS,
            "sep": ":",
            "queue_order_strategy": "priority",
            # Unacked messages of a dead worker come back after visibility_timeout; sweep often enough
            # that "after" means seconds, not kombu's default of up to 100 s more.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 5)),
            "unacked_restore_throttle": 1,
            # The sweep's mutex is a Redis key with this expiry. A worker that loses Redis mid-sweep (a restart:
            # AOF keeps the key) cannot release it, and kombu's 300 s default then held back every dead
            # worker's job for five minutes (measured by bench/chaos.py). A sweep takes milliseconds.
            "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S,
            # Timeouts, and master_name for a sentinel:// URL.
            **broker_transport_options(settings),
        },
        # A publish to a dead broker gives up after a few quick tries: submit fails in bounded time.
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Task events cost a PUBLISH each, 4 per job: off unless VARCO_TASK_EVENTS=true, and turned on at run time
        # by Flower or `celery control enable_events` (the worker keeps its dispatcher up: runtime/main.py).
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
    )
    if amqp:  # RabbitMQ: quorum queues in place of kombu's Redis lists (docs/brokers.md)
        app.conf.update(amqp_conf(app_queues(settings)))
    return app


def app_queues(settings: Settings) -> list[str]:
    """Every queue the app publishes to or consumes: inference (and VARCO_TASK_ROUTES's) and webhooks."""
    return list(dict.fromkeys([INFER_QUEUE, *settings.task_routes.values(), CALLBACK_QUEUE, CALLBACK_BATCH_QUEUE]))


def queue_lanes(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue: one per priority step ("varco", "varco:1", …)."""
    return [queue_lane(queue, step) for step in PRIORITY_STEPS]


def queue_depth(client: redis.Redis, queue: str = INFER_QUEUE) -> int:
    """Jobs waiting in a queue, all priority lanes together (what autoscaling should watch)."""
    return sum(client.llen(lane) for lane in queue_lanes(queue))


def prepare_broker(app: Celery) -> None:
    """What a worker sets up on its broker before it consumes: on RabbitMQ, the dead-letter queue and every
    queue of the app. Never raises: a worker that cannot reach the broker yet waits for it in Celery (which
    declares the queues it consumes), and declares the rest again at its next start."""
    if not is_amqp(app.conf.broker_url):
        return
    try:
        declare_queues(app.connection_for_write(), list(app.conf.task_queues))
    except (OSError, *BROKER_ERRORS) as exc:
        log.warning("could not declare the queues and %s (%r)", DEAD_LETTER_QUEUE, exc)


def depth_reader(app: Celery, client: redis.Redis) -> Callable[[str], int]:
    """`queue -> jobs waiting` from the broker the app uses: kombu's Redis lists, or a RabbitMQ queue."""
    if is_amqp(app.conf.broker_url):
        return AmqpQueueDepth(app.connection_for_read())
    return functools.partial(queue_depth, client)


_app: Celery | None = None


def __getattr__(name: str) -> Celery:
    """`app`/`celery`: the process's app from VARCO_* settings, built on first use (what `celery -A` finds)."""
    global _app
    if name in ("app", "celery"):
        if _app is None:
            _app = create_app(get_settings())
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
