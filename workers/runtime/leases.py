"""Keeps running jobs theirs: one heartbeat thread per worker process renews, for every job it runs,
the lease in the job's status record and the job's message visibility in the broker.

The Redis transport (tasks/redis_transport.py) keeps each unacknowledged message as a member of the
`varco:unacked` sorted set, scored by delivery time; its restore sweep re-queues entries scored older than
the visibility timeout. Re-scoring a running job's member to "now" (ZADD XX: only if it is still there, so
an acked or already restored message is never brought back) keeps a long job from being delivered again
while its worker lives. The task thread knows its delivery tag; the transport's in-process map gives the
member (a message a stock kombu consumer delivered is re-scored by tag in kombu's `unacked_index`). A
worker killed -9 stops beating: its message comes back after the visibility timeout and its lease has lapsed
by then (leases last half of it), so the job runs again elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis
from celery import Celery

from varco.tasks import keys
from varco.tasks.brokers import is_amqp
from varco.tasks.redis_transport import unacked_member
from varco.tasks.status import StatusStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Held:
    token: str  # this run's lease token, unique per delivery
    delivery_tag: str | None  # the broker's tag of the message being run
    thread: int  # the task thread running it: only that thread releases it


def unacked_keys(app: Celery) -> tuple[str, str]:
    """The sorted sets unacknowledged messages are scored in: the transport's (members are messages) and
    kombu's stock one (members are delivery tags), with the broker's key prefix."""
    options = app.conf.broker_transport_options or {}
    prefix = options.get("global_keyprefix", "")
    return f"{prefix}{keys.UNACKED_MESSAGES}", f"{prefix}{options.get('unacked_index_key', keys.UNACKED_INDEX)}"


class LeaseKeeper:
    def __init__(self, client: redis.Redis, statuses: StatusStore, app: Celery, visibility_timeout: float) -> None:
        self.redis, self.statuses = client, statuses
        # RabbitMQ keeps a message unacked for as long as its consumer's channel lives: nothing to re-score.
        self.index_keys = None if is_amqp(app.conf.broker_url) else unacked_keys(app)
        # A lease lasts half the visibility timeout and is renewed six times per timeout, so a live job's
        # message and lease never come near expiry, and a dead worker's lease is gone before its message returns.
        self.lease_s = visibility_timeout / 2
        self.interval_s = visibility_timeout / 6
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def hold(self, job_id: str, token: str, delivery_tag: str | None) -> None:
        """Keep renewing this run's lease and message until the calling thread releases it. The message is not
        re-scored here (a ZADD per job saved): it was scored at its delivery, milliseconds ago (a worker holds
        no more messages than it has task threads), and the next beat, at most visibility_timeout / 6 away,
        re-scores it long before the sweep's visibility_timeout."""
        with self._lock:
            self._held[job_id] = Held(token, delivery_tag, threading.get_ident())

    def release(self, job_id: str) -> None:
        """The calling thread's run of `job_id` is over: stop renewing and give the lease up. A no-op for a
        thread that holds nothing (e.g. one that deferred a second copy of a job this process runs)."""
        with self._lock:
            held = self._held.get(job_id)
            if held is None or held.thread != threading.get_ident():
                return
            del self._held[job_id]
        if self.statuses.lease_ended_here(job_id):
            return  # this run's terminal transition deleted the lease in the same step: 2 Redis commands saved
        try:
            self.statuses.release_lease(job_id, held.token)
        except redis.RedisError as exc:  # it lapses by itself within lease_s
            log.warning("could not release the lease of job %s (%r)", job_id, exc)

    def beat(self) -> None:
        """Renew every held lease and message once (the thread's step; tests call it directly)."""
        with self._lock:
            held = dict(self._held)
        if not held:
            return
        self.statuses.renew_leases({job_id: h.token for job_id, h in held.items()}, self.lease_s)
        self._touch_messages([h.delivery_tag for h in held.values() if h.delivery_tag])

    def _touch_messages(self, tags: list[str]) -> None:
        if not tags or not self.index_keys:
            return
        now = time.time()  # deliveries are scored with the worker's clock, and the sweep compares with it
        members = {tag: unacked_member(tag) for tag in tags}
        messages_key, stock_key = self.index_keys
        if any(members.values()):
            self.redis.zadd(messages_key, dict.fromkeys(filter(None, members.values()), now), xx=True)
        if stock := [tag for tag, member in members.items() if member is None]:
            self.redis.zadd(stock_key, dict.fromkeys(stock, now), xx=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError as exc:  # the next beat tries again; a lapse only risks a deferred redelivery
                log.warning("could not renew job leases (%r)", exc)
