"""The wait algorithm's decisions, with no Redis and no clock: times are plain numbers passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from varco.tasks.schemas import JobState, JobStatus
from varco.tasks.waiting import FinishLine, Follow, Listen, Read, TimedOut, WaitPlan, newer

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def status(job_id: str, state: JobState, at_s: float | None = 0.0) -> JobStatus:
    updated = None if at_s is None else T0 + timedelta(seconds=at_s)
    return JobStatus(job_id=job_id, state=state, updated_at=updated)


def test_a_wait_reads_first_then_listens_until_the_next_read() -> None:
    plan = WaitPlan(100.0, None, reread_s=1.0)
    assert plan.next_step(100.0) == Read()
    assert plan.next_step(100.25) == Listen(0.75)
    assert plan.next_step(100.9) == Listen(pytest.approx(0.1))
    assert plan.next_step(101.0) == Read()
    assert plan.next_step(101.5) == Listen(0.5)


def test_without_a_timeout_a_wait_never_times_out() -> None:
    plan = WaitPlan(0.0, None, reread_s=1.0)
    steps = [plan.next_step(t / 2) for t in range(10_000)]
    assert TimedOut() not in steps and steps.count(Read()) == 5_000


def test_listening_stops_at_the_deadline_and_a_due_read_comes_before_the_timeout() -> None:
    plan = WaitPlan(0.0, 2.5, reread_s=1.0)
    assert plan.next_step(0.0) == Read()
    assert plan.next_step(2.2) == Read()  # late, but due: the records are seen once more
    assert plan.next_step(2.3) == Listen(pytest.approx(0.2))  # not to the next read at 3.2
    assert plan.next_step(2.5) == Read()  # the last look, at the deadline
    assert plan.next_step(2.5) == TimedOut()
    assert plan.next_step(3.5) == Read()
    assert plan.next_step(3.6) == TimedOut()


def test_a_wait_follows_the_events_and_reads_only_at_the_reread_interval() -> None:
    plan = WaitPlan(0.0, None)  # the default interval: events carry every change
    steps = [plan.next_step(t / 10) for t in range(600)]  # a minute of steps
    assert steps.count(Read()) == 2  # at 0 and at REREAD_S (30 s), not once a second


def test_a_resubscribed_feed_makes_the_next_step_a_read() -> None:
    plan = WaitPlan(0.0, None)
    assert plan.next_step(0.0) == Read()
    assert plan.next_step(5.0) == Listen(25.0)
    plan.missed_events(5.5)  # the subscription reconnected: what was published meanwhile is lost
    assert plan.next_step(5.5) == Read()
    assert plan.next_step(6.0) == Listen(29.5)


def test_a_wait_that_heard_nothing_reads_once_at_its_deadline_before_timing_out() -> None:
    plan = WaitPlan(0.0, 10.0)
    assert plan.next_step(0.0) == Read()
    assert plan.next_step(1.0) == Listen(9.0)
    assert [plan.next_step(10.0), plan.next_step(10.0)] == [Read(), TimedOut()]


def test_a_zero_timeout_reads_once_then_times_out() -> None:
    plan = WaitPlan(5.0, 0.0)
    assert [plan.next_step(5.0), plan.next_step(5.0)] == [Read(), TimedOut()]


def test_an_outage_is_ridden_out_for_the_grace_then_given_up() -> None:
    plan = WaitPlan(0.0, None, poll_interval_s=1.0, outage_grace_s=60.0)
    plan.next_step(0.0)
    assert plan.outage(10.0)
    assert plan.next_step(10.5) == Read()  # after the pause, the records are read again
    assert plan.outage(69.9)
    assert not plan.outage(70.0)  # 60 s since the outage began


def test_an_answer_ends_the_outage_and_restarts_its_grace() -> None:
    plan = WaitPlan(0.0, None, outage_grace_s=60.0)
    assert plan.outage(10.0)
    plan.answered()
    assert plan.outage(65.0) and plan.outage(124.0)
    assert not plan.outage(125.0)


def test_an_outage_past_the_deadline_is_given_up_at_once() -> None:
    plan = WaitPlan(0.0, 5.0, outage_grace_s=60.0)
    assert plan.outage(4.0)
    assert not plan.outage(5.0)


def test_news_is_a_later_change_or_the_same_instant_further_on() -> None:
    assert newer(status("j", JobState.STARTED, 2), status("j", JobState.SUCCEEDED, 1))
    assert newer(status("j", JobState.SUCCEEDED, 1), status("j", JobState.STARTED, 1))
    assert not newer(status("j", JobState.STARTED, 1), status("j", JobState.SUCCEEDED, 1))
    assert not newer(status("j", JobState.STARTED, 1), status("j", JobState.STARTED, 1))
    assert newer(status("j", JobState.QUEUED, 0), status("j", JobState.CANCELLED, None))  # no time: oldest
    # started and retrying share a rank: at the same instant neither is news over the other
    assert not newer(status("j", JobState.RETRYING, 1), status("j", JobState.STARTED, 1))


def test_a_finish_line_reports_each_jobs_end_once() -> None:
    line = FinishLine(["a", "b"])
    assert line.offer(None) is None
    assert line.offer(status("a", JobState.STARTED)) is None
    assert line.offer(status("c", JobState.SUCCEEDED)) is None  # not waited for
    done = status("a", JobState.FAILED)
    assert line.offer(done) is done and line.pending == {"b"}
    assert line.offer(status("a", JobState.SUCCEEDED)) is None  # the event of an end already read
    assert line.offer(status("b", JobState.CANCELLED)) is not None and not line.pending


def test_following_a_job_reports_only_newer_statuses_of_it() -> None:
    follow = Follow("j", now=0.0)
    first = status("j", JobState.STARTED, 5)
    assert follow.offer(first, 0.0) is first and not follow.finished
    assert follow.offer(status("j", JobState.QUEUED, 1), 0.1) is None  # an event buffered before the read
    assert follow.offer(status("j", JobState.STARTED, 5), 0.2) is None  # the same news again
    assert follow.offer(status("other", JobState.SUCCEEDED, 9), 0.3) is None
    assert follow.offer(None, 0.4) is None and follow.last is first
    end = status("j", JobState.SUCCEEDED, 6)
    assert follow.offer(end, 0.5) is end and follow.finished


def test_a_heartbeat_comes_after_heartbeat_s_without_news() -> None:
    follow = Follow("j", now=0.0, heartbeat_s=15.0)
    assert not follow.heartbeat(14.9)
    assert follow.heartbeat(15.0)
    assert not follow.heartbeat(29.9)  # counted as sent at 15
    follow.offer(status("j", JobState.STARTED), 20.0)
    assert not follow.heartbeat(34.9) and follow.heartbeat(35.0)
    assert not Follow("j", now=0.0).heartbeat(1e9)  # none asked for


def test_the_state_order() -> None:
    assert [s.rank for s in JobState] == [0, 1, 1, 2, 2, 2]
    assert [s for s in JobState if s.finished] == [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]
