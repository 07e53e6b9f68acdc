"""The worker's side of the fair queue (issue 19): a ticket message in, the job it runs out.

A ticket names no job (tasks/fair_queue.py). When a task thread starts one, `take` picks the job by fair
share, or gets the job this ticket picked before it was delivered again; the thread then runs that job as
it ran a job message before. `release` forgets the job once its run has ended; a run handed to a Celery retry
keeps it, since the retry re-publishes the same ticket id. A job whose deadline passed while it was queued
is `late`: it is failed with DeadlineExceeded and never reaches the engine. `TicketRefill` gives a job that
was left without a ticket one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from varco.tasks import keys
from varco.tasks.brokers import is_amqp
from varco.tasks.celery_app import depth_reader
from varco.tasks.errors import DeadlineExceeded
from varco.tasks.fair_queue import FairQueue, send_ticket, ticket_queue
from varco.tasks.job_ids import is_valid_job_id
from varco.tasks.schemas import JobState
from varco.tasks.status import StatusStore
from varco.tasks.tenants import metric_label
from varco.workers import metrics

log = logging.getLogger(__name__)
SHARE_LOG_S = 60.0


@dataclass(frozen=True)
class Ticket:
    """A ticket message: the queue whose jobs it may pick, and its own id (the Celery task id)."""

    queue: str
    ticket_id: str


@dataclass(frozen=True)
class Taken:
    """What a ticket runs: the job's message arguments, its tenant, and whether it is late (never run)."""

    job_id: str
    tenant: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    late: bool
    trace: dict[str, str] = field(default_factory=dict)  # the submitter's trace context (tasks/tracing.py)


def ticket_of(task_id: object, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Ticket | None:
    """The ticket a message is, or None for a job message (the format before issue 19) or a broken ticket."""
    queue = ticket_queue(args, kwargs)
    if queue is None or not is_valid_job_id(task_id):
        return None
    return Ticket(queue, task_id)  # type: ignore[arg-type]


class FairPicker:
    def __init__(self, client: redis.Redis, statuses: StatusStore, weights: Mapping[str, float]) -> None:
        self.queue = FairQueue(client, weights)
        self.statuses = statuses
        self.weights = dict(weights)
        self._lock = threading.Lock()
        self._picks: Counter[str] = Counter()
        self._competing = False  # whether several tenants had queued jobs at a pick since the last line
        self._since = time.monotonic()

    def take(self, ticket: Ticket) -> Taken | None:
        """The job this ticket runs, or None: nothing is queued (its job was cancelled, or ran already)."""
        picked = self.queue.pick(ticket.queue, ticket.ticket_id)
        if picked is None:
            log.info("ticket %s found no job queued on %s", ticket.ticket_id, ticket.queue)
            return None
        args, kwargs = picked.task_args
        # Late only if it never started: a run that started in time and whose worker died runs again.
        late = picked.expired and self._still_queued(picked.job_id)
        if picked.waiting >= 0:  # a new pick, not a ticket delivered again
            metrics.PICKS.labels(tenant=metric_label(picked.tenant, self.weights)).inc()
            self._note(picked.tenant, picked.waiting)
        return Taken(picked.job_id, picked.tenant, args, kwargs, late, picked.trace)

    def _note(self, tenant: str, waiting: int) -> None:
        """Say in the log, at most once per SHARE_LOG_S, how the picks were shared while tenants competed (a
        tenant below its backlog's pace is throttled to its share there)."""
        with self._lock:
            self._picks[tenant] += 1
            self._competing = self._competing or waiting > 1
            now = time.monotonic()
            if now - self._since < SHARE_LOG_S:
                return
            picks, competing, since = self._picks, self._competing, self._since
            self._picks, self._competing, self._since = Counter(), False, now
        if competing:
            total = sum(picks.values())
            shares = ", ".join(f"{t} {n / total:.0%}" for t, n in picks.most_common(10))
            log.info("fair share over the last %.0fs, tenants throttled to their weights: %s of %d picks", now - since,
                     shares, total)  # fmt: skip

    def _still_queued(self, job_id: str) -> bool:
        status = self.statuses.get(job_id) if is_valid_job_id(job_id) else None
        return status is not None and status.state is JobState.QUEUED

    def deadline_error(self, taken: Taken) -> DeadlineExceeded:
        """The error a late job ends with; counted in varco_jobs_expired_total."""
        metrics.EXPIRED.labels(tenant=metric_label(taken.tenant, self.weights)).inc()
        log.info("job %s of tenant %s: its deadline passed before it started; not run", taken.job_id, taken.tenant)
        return DeadlineExceeded("the job did not start before its deadline (deadline_s after submission)")

    def release(self, ticket: Ticket, taken: Taken) -> None:
        """The run of the job the ticket took has ended: the job leaves the fair queue. Never raises (a lost
        release leaves a small binding behind; the job itself has ended)."""
        try:
            self.queue.release(ticket.queue, ticket.ticket_id, taken.job_id)
        except redis.RedisError as exc:
            log.warning("could not release ticket %s (%r)", ticket.ticket_id, exc)


class TicketRefill:
    """Gives a job left without a ticket one, so it cannot wait for ever.

    Tickets and queued jobs are published one after the other, not atomically: a producer killed between
    inserting its jobs and publishing their tickets, or a ticket the broker transport loses in a crash (kombu
    pops a message before it records it as unacknowledged), leaves jobs that no ticket will pick. Every
    `interval_s`, per queue: deficit = jobs queued in the fair queue - tickets waiting on its lists - every
    message in flight (the transport's `varco:unacked` set and a stock kombu worker's `unacked` hash, all
    queues: an overestimate of the tickets, so the deficit is never overstated). A deficit seen on two
    checks in a row gets that many tickets (the smaller of the two), so a producer between its insert and
    its publishes is not answered. A spare ticket finds nothing and costs one pick; a missing one would strand a job."""

    def __init__(self, app: Celery, client: redis.Redis, queues: Iterable[str], interval_s: float) -> None:
        self.app, self.redis, self.queues, self.interval_s = app, client, list(queues), interval_s
        self.fair = FairQueue(client)
        self.depth = depth_reader(app, client)
        # RabbitMQ has no such set: a ticket is in flight there only between its delivery and its pick (a
        # task thread takes one message at a time), so none is counted, and a spare ticket costs one pick.
        options = app.conf.broker_transport_options or {}
        prefix = options.get("global_keyprefix", "")
        self.unacked_keys = (
            None
            if is_amqp(app.conf.broker_url)
            else (f"{prefix}{keys.UNACKED_MESSAGES}", f"{prefix}{options.get('unacked_key', keys.UNACKED_HASH)}")
        )
        self._seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ticket-refill", daemon=True)

    def start(self) -> TicketRefill:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _in_flight(self) -> int:
        """Messages delivered and not acked: the transport's set, plus what stock kombu workers hold."""
        if not self.unacked_keys:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.unacked_keys[0]).hlen(self.unacked_keys[1])
        return sum(pipe.execute())

    def check(self) -> int:
        """One round over the queues; how many tickets it published."""
        in_flight = self._in_flight()
        published = 0
        for queue in self.queues:
            deficit = self.fair.queued_in(queue) - self.depth(queue) - in_flight
            missing = min(deficit, self._seen.get(queue, 0))
            self._seen[queue] = max(deficit, 0)
            if missing > 0:
                log.warning("%d queued job(s) on %s had no ticket; publishing %d", missing, queue, missing)
                for _ in range(missing):
                    send_ticket(self.app, queue)
                published += missing
                self._seen[queue] = 0
        return published

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # the next round tries again; never the worker's death
                log.warning("ticket refill failed (%r)", exc)
