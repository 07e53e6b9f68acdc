"""The Celery binding of the job lifecycle: arguments in, `self.retry` mapped, delivery tag passed on, and
the revoke and undecodable hooks ending a job's record. The lifecycle itself is faked here."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Task
from celery.exceptions import Reject, Retry
from celery.signals import task_revoked

from varco.tasks import keys
from varco.tasks.celery_app import INFER_TASK, broker_priority, create_app
from varco.tasks.errors import DeadlineExceeded
from varco.tasks.fair_queue import ticket_kwargs
from varco.tasks.messages import InferMessage
from varco.tasks.schemas import JobState
from varco.tasks.settings import Settings
from varco.tasks.status import StatusStore
from varco.workers.devtools.local_redis import LocalRedis, start_redis
from varco.workers.runtime import celery_task, undecodable
from varco.workers.runtime.celery_task import celery_retry, register_inference_task
from varco.workers.runtime.fair_pick import Taken
from varco.workers.runtime.lifecycle import RetryNotQueued

JOB = "job-1"
REQUEST = {"image_uri": "https://img.example/cat.png", "task": "caption"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with start_redis(tmp_path_factory.mktemp("redis-celery-task")) as s:
        yield s


@pytest.fixture(scope="module")
def bound(server: LocalRedis) -> tuple[Any, Task, StatusStore]:
    """One app with the task registered (the revoke hook is a process-wide signal: registered once)."""
    app = create_app(Settings(broker_url=server.url))
    statuses = StatusStore(redis.Redis.from_url(server.url, decode_responses=True), ttl=600)
    runtime = SimpleNamespace(statuses=statuses, fair=None)
    return app, register_inference_task(app, lambda: runtime), statuses  # type: ignore[arg-type, return-value]


@pytest.fixture
def delivered(bound: tuple[Any, Task, StatusStore], monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The lifecycle's `deliver`, faked: records its arguments; a call may `retry` through `countdown`."""
    bound[2].redis.flushdb()
    calls: list[dict[str, Any]] = []

    def deliver(
        rt: Any, job_id: str, message: InferMessage, retry: Any, *, delivery_tag: str | None, late: Any = None,
        trace: Any = None, ticket_trace: Any = None,
    ) -> None:  # fmt: skip
        calls.append({"rt": rt, "job_id": job_id, "message": message, "delivery_tag": delivery_tag, "late": late})
        if countdown := getattr(message.request, "get", lambda _: None)("countdown"):
            retry(countdown)

    monkeypatch.setattr(celery_task, "deliver", deliver)
    return calls


def test_the_task_hands_the_message_and_delivery_tag_to_the_lifecycle(bound, delivered) -> None:
    app, infer, statuses = bound
    task = app.tasks[INFER_TASK]
    assert task.name == infer.name == INFER_TASK and task.acks_late and task.max_retries is None
    infer.push_request(id=JOB, properties={"delivery_tag": "tag-9"})
    try:
        infer.run(JOB, REQUEST, enqueued_at="2026-12-01T00:00:00+00:00")
    finally:
        infer.pop_request()
    [call] = delivered
    assert call["rt"].statuses is statuses and call["job_id"] == JOB and call["delivery_tag"] == "tag-9"
    assert call["message"] == InferMessage(JOB, REQUEST, "2026-12-01T00:00:00+00:00")


def test_a_message_without_properties_has_no_delivery_tag(bound, delivered) -> None:
    bound[1](JOB, REQUEST)
    assert delivered[0]["delivery_tag"] is None and delivered[0]["message"].problem is None


def test_a_message_without_a_valid_job_id_is_dropped(bound, delivered, caplog: pytest.LogCaptureFixture) -> None:
    bound[1]("../../etc", REQUEST)
    assert delivered == []
    assert "dropped a varco.infer message" in caplog.text and "does not match the job id pattern" in caplog.text


def test_retry_is_celerys_retry(bound, delivered) -> None:
    # Called directly (not in a worker), Celery's retry raises Retry at once: the delivery ends with it.
    with pytest.raises(Retry):
        bound[1](JOB, REQUEST | {"countdown": 5.0})


def test_retry_asks_for_the_countdown_without_a_retry_limit() -> None:
    asked: list[dict[str, Any]] = []

    def retry(**kwargs: Any) -> None:
        asked.append(kwargs)
        raise Retry("queued", None)

    with pytest.raises(Retry):
        celery_retry(SimpleNamespace(retry=retry))(7.5)  # type: ignore[arg-type]
    assert asked == [{"countdown": 7.5, "max_retries": None}]


def test_a_retry_the_broker_refuses_is_retry_not_queued() -> None:
    def retry(**kwargs: Any) -> None:
        raise Reject(ConnectionError("broker down"), requeue=False)

    with pytest.raises(RetryNotQueued, match="could not queue the retry") as caught:
        celery_retry(SimpleNamespace(retry=retry))(1.0)  # type: ignore[arg-type]
    assert isinstance(caught.value.__cause__, Reject)


def test_a_revoked_job_ends_cancelled(bound, delivered) -> None:
    _, infer, statuses = bound
    statuses.create(JOB, "caption")

    def other_task() -> None:
        """Any task but varco.infer."""

    other = bound[0].task(name="test.other", shared=False)(other_task)
    task_revoked.send(sender=other, request=SimpleNamespace(id=JOB))
    task_revoked.send(sender=infer, request=None)
    task_revoked.send(sender=infer, request=SimpleNamespace(id="not a job id!"))
    assert statuses.get(JOB).state is JobState.QUEUED
    task_revoked.send(sender=infer, request=SimpleNamespace(id=JOB), terminated=False, signum=None, expired=False)
    assert statuses.get(JOB).state is JobState.CANCELLED


def test_a_revoked_ticket_cancels_its_job_and_leaves_a_ticket_for_the_queue(bound, delivered) -> None:
    """A job's ticket carries the job's id, so `celery control revoke JOB` still cancels it; the job stays in
    the fair queue, and a new ticket keeps one per queued job (its delivery sends the job.cancelled)."""
    _, infer, statuses = bound
    statuses.create(JOB, "caption")
    lane_key = keys.queue_lane("varco", broker_priority(None))  # a ticket goes at the default priority
    lane = statuses.redis.llen(lane_key)
    task_revoked.send(sender=infer, request=SimpleNamespace(id=JOB, args=[], kwargs=ticket_kwargs("varco")))
    assert statuses.get(JOB).state is JobState.CANCELLED
    assert statuses.redis.llen(lane_key) == lane + 1
    task_revoked.send(sender=infer, request=SimpleNamespace(id=JOB, args=[], kwargs=ticket_kwargs("varco")))
    assert statuses.redis.llen(lane_key) == lane + 2  # each dropped ticket is replaced, cancelled job or not


def test_an_undecodable_message_fails_its_job(bound, delivered) -> None:
    app, _, statuses = bound
    assert app.conf.worker_consumer == "varco.workers.runtime.undecodable:ReportingConsumer"
    handler = undecodable._handlers[id(app)]
    statuses.create(JOB, "caption")
    handler({"id": JOB, "task": "other.task"}, ValueError("bad"))
    handler({"id": "not a job id!", "task": INFER_TASK}, ValueError("bad"))
    assert statuses.get(JOB).state is JobState.QUEUED
    handler({"id": JOB, "task": INFER_TASK}, ValueError("nested too deep"))
    status = statuses.get(JOB)
    assert status.state is JobState.FAILED and status.error.type == "InvalidRequest"
    assert status.error.message == "the job message cannot be decoded: nested too deep"


class FakeFair:
    """The fair queue's worker side, faked: one ticket runs the job it is given, then is released with it."""

    def __init__(self, taken: Any) -> None:
        self.taken, self.released, self.late = taken, [], DeadlineExceeded("not started within 5s")

    def take(self, ticket: Any) -> Any:
        return self.taken

    def release(self, ticket: Any, taken: Any) -> None:
        self.released.append((ticket.ticket_id, taken.job_id))

    def deadline_error(self, taken: Any) -> DeadlineExceeded:
        return self.late


@pytest.mark.parametrize("late", [False, True])
def test_a_ticket_runs_the_job_the_fair_queue_picks_then_is_released(bound, delivered, late: bool) -> None:
    statuses = bound[2]
    runtime = SimpleNamespace(statuses=statuses, fair=None)
    ticketed = register_inference_task(create_app(Settings(broker_url="redis://127.0.0.1:1/0")), lambda: runtime)  # type: ignore[arg-type]
    runtime.fair = FakeFair(Taken(JOB, "teamA", (JOB, REQUEST), {"enqueued_at": "2026-12-01T00:00:00+00:00"}, late))
    ticket_id = "f" * 32
    ticketed.push_request(id=ticket_id)
    try:
        ticketed.run(**ticket_kwargs("varco"))
    finally:
        ticketed.pop_request()
    [call] = delivered
    assert call["job_id"] == JOB and call["message"] == InferMessage(JOB, REQUEST, "2026-12-01T00:00:00+00:00")
    assert call["late"] is (runtime.fair.late if late else None)
    assert runtime.fair.released == [(ticket_id, JOB)]


def test_a_ticket_whose_job_is_gone_runs_nothing_and_releases_nothing(bound, delivered) -> None:
    statuses = bound[2]
    runtime = SimpleNamespace(statuses=statuses, fair=FakeFair(None))
    ticketed = register_inference_task(create_app(Settings(broker_url="redis://127.0.0.1:1/0")), lambda: runtime)  # type: ignore[arg-type]
    ticketed.push_request(id="e" * 32)
    try:
        ticketed.run(**ticket_kwargs("varco"))
    finally:
        ticketed.pop_request()
    assert delivered == [] and runtime.fair.released == []  # it took no job, so it holds none (no Redis call)
