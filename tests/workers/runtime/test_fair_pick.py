"""The worker's side of the fair queue on a real redis-server: tickets told from job messages, the job a
ticket runs, late jobs (deadline passed, never started) and released tickets."""

from __future__ import annotations

import logging
import time

import pytest
import redis

from varco.tasks.celery_app import create_app, queue_depth
from varco.tasks.fair_queue import FairQueue, QueuedJob, job_body, send_ticket, ticket_kwargs
from varco.tasks.keys import UNACKED_MESSAGES
from varco.tasks.schemas import JobState
from varco.tasks.settings import Settings
from varco.tasks.status import StatusStore
from varco.workers import metrics
from varco.workers.runtime import fair_pick
from varco.workers.runtime.fair_pick import FairPicker, Taken, Ticket, TicketRefill, ticket_of

REQUEST = {"image_uri": "file:///x.png", "task": "caption", "tenant": "teamA"}


@pytest.fixture
def client(flushed_redis: redis.Redis) -> redis.Redis:
    return flushed_redis


@pytest.fixture
def statuses(client: redis.Redis) -> StatusStore:
    return StatusStore(client, ttl=120)


def enqueue(client: redis.Redis, statuses: StatusStore, job_id: str, deadline_s: float | None = None) -> None:
    statuses.create(job_id, "caption", tenant="teamA")
    body = job_body(job_id, REQUEST, "2026-01-01T00:00:00+00:00")
    FairQueue(client).insert([QueuedJob(job_id, "varco", "teamA", 4, body, deadline_s)])


def sample(name: str, **labels: str) -> float:
    counter = metrics.EXPIRED if name == "expired" else metrics.PICKS
    return counter.labels(**labels)._value.get()


def test_a_ticket_is_told_from_a_job_message() -> None:
    assert ticket_of("t1", (), ticket_kwargs("varco")) == Ticket("varco", "t1")
    assert ticket_of("job-1", ("job-1", REQUEST), {"enqueued_at": "x"}) is None  # the format before issue 19
    assert ticket_of("../x", (), ticket_kwargs("varco")) is None  # a task id that is no id
    assert ticket_of("t1", (), {"fair_ticket": ["varco"]}) is None


def test_take_gives_the_jobs_message_arguments_and_counts_the_pick(client, statuses: StatusStore) -> None:
    picker = FairPicker(client, statuses, {"teamA": 3})
    enqueue(client, statuses, "j1")
    before = sample("picks", tenant="teamA")
    taken = picker.take(Ticket("varco", "t1"))
    assert taken is not None and (taken.job_id, taken.tenant, taken.late) == ("j1", "teamA", False)
    assert taken.args == ("j1", REQUEST) and taken.kwargs == {"enqueued_at": "2026-01-01T00:00:00+00:00"}
    assert sample("picks", tenant="teamA") == before + 1
    assert picker.take(Ticket("varco", "t1")) == taken  # delivered again: the same job (counted once)
    assert sample("picks", tenant="teamA") == before + 1
    picker.release(Ticket("varco", "t1"), taken)
    assert picker.take(Ticket("varco", "t1")) is None  # its job has ended; nothing else is queued


def test_a_job_past_its_deadline_is_late_only_while_it_never_started(client, statuses: StatusStore) -> None:
    picker = FairPicker(client, statuses, {})
    enqueue(client, statuses, "late", deadline_s=0.001)
    enqueue(client, statuses, "crashed", deadline_s=0.001)
    time.sleep(0.01)
    late = picker.take(Ticket("varco", "t1"))
    assert late is not None and late.job_id == "late" and late.late
    before = sample("expired", tenant="other")
    error = picker.deadline_error(late)
    assert type(error).__name__ == "DeadlineExceeded" and sample("expired", tenant="other") == before + 1
    # A run that started in time and whose worker died is delivered again past the deadline: it runs.
    statuses.claim("crashed", "gpu0@a", 3, token="tok", lease_s=0.0)
    assert statuses.get("crashed").state is JobState.STARTED  # type: ignore[union-attr]
    again = picker.take(Ticket("varco", "t2"))
    assert again is not None and again.job_id == "crashed" and not again.late


def test_a_release_that_cannot_reach_redis_does_not_raise(statuses: StatusStore) -> None:
    dead = redis.Redis(port=1, socket_connect_timeout=0.2)
    FairPicker(dead, statuses, {}).release(Ticket("varco", "t1"), Taken("j1", "teamA", (), {}, False))


def test_jobs_left_without_a_ticket_get_one_after_two_checks(client, statuses: StatusStore, module_redis) -> None:
    app = create_app(Settings(broker_url=module_redis.url))
    refill = TicketRefill(app, client, ["varco"], interval_s=60)
    enqueue(client, statuses, "has-ticket")
    send_ticket(app, "varco")
    enqueue(client, statuses, "stranded-1")  # as if its producer died before publishing its ticket
    enqueue(client, statuses, "stranded-2")
    assert refill.check() == 0  # once: it may be a producer between its insert and its publishes
    assert refill.check() == 2 and queue_depth(client, "varco") == 3
    assert refill.check() == 0 and refill.check() == 0  # every job has its ticket now
    client.zadd(UNACKED_MESSAGES, {"[{}]": 1.0})  # a message in flight may be a ticket: never too many
    enqueue(client, statuses, "stranded-3")
    assert refill.check() == 0 and refill.check() == 0
    client.zrem(UNACKED_MESSAGES, "[{}]")
    client.hset("unacked", "tag-1", "{}")  # one a stock kombu worker holds (a rolling upgrade) counts too
    assert refill.check() == 0 and refill.check() == 0
    client.hdel("unacked", "tag-1")
    assert refill.check() == 0 and refill.check() == 1 and queue_depth(client, "varco") == 4


def test_the_log_says_how_competing_tenants_were_shared(client, statuses, monkeypatch, caplog) -> None:
    picker = FairPicker(client, statuses, {"teamA": 3})
    body = job_body("x", REQUEST, "2026-01-01T00:00:00+00:00")
    jobs = [QueuedJob(f"{t}-{i}", "varco", t, 4, body) for t in ("teamA", "teamB") for i in range(8)]
    FairQueue(client).insert(jobs)
    caplog.set_level(logging.INFO, logger="varco.workers.runtime.fair_pick")
    for i in range(7):
        picker.take(Ticket("varco", f"t{i}"))
    assert not [r for r in caplog.records if "fair share" in r.message]  # at most once per SHARE_LOG_S
    monkeypatch.setattr(fair_pick, "SHARE_LOG_S", 0.0)
    picker.take(Ticket("varco", "t7"))
    [line] = [r.getMessage() for r in caplog.records if "fair share" in r.getMessage()]
    assert "throttled to their weights: teamA 75%, teamB 25% of 8 picks" in line
    caplog.clear()
    FairQueue(client).insert([QueuedJob(f"solo-{i}", "varco.solo", "solo", 4, body) for i in range(2)])
    picker.take(Ticket("varco.solo", "s1"))
    picker.take(Ticket("varco.solo", "s2"))
    assert not [r for r in caplog.records if "fair share" in r.getMessage()]  # one tenant alone: nobody throttled
