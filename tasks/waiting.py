"""Waiting for jobs, decided without Redis: when to read the records, how long to listen for events, when
the wait has timed out, which statuses are news, and how long a Redis outage is ridden out.

Two thin loops run it: `Client.wait` (sync; many jobs, each one's final status once) and
`gateway/sse.watch` (asyncio; one job, every newer status). Each subscribes to the events channel before
its first read, so no change slips between; it then asks `WaitPlan.next_step` what to do. Events carry every
change, so the records are read again only when events may have been missed: at once after the subscription
reconnected (the feeds count their connections: `resubscribed`), after a Redis outage, once more before a
wait times out, and every REREAD_S besides, in case a reconnect went unseen. That was one read per pending
job per second before (issue 24: most of a waiting client's Redis commands).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from varco.tasks.schemas import JobStatus

POLL_INTERVAL_S = 1.0
"""How long a wait pauses after Redis failed a step, before it subscribes and reads again."""
REREAD_S = 30.0
"""How often a wait reads the records again while its subscription holds (it follows the events)."""
OUTAGE_GRACE_S = 60.0
"""How long a wait that has reached Redis rides out losing it (a restart, or a sentinel failover:
down-after-milliseconds, 30 s by default, plus the election) before it gives up."""
_EPOCH = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Read:
    """Read the records now: first, then every poll interval, and again after an outage."""


@dataclass(frozen=True)
class Listen:
    """Listen for an event up to `seconds` (until the next read, or the deadline)."""

    seconds: float


@dataclass(frozen=True)
class TimedOut:
    """The wait's timeout has passed."""


Step = Read | Listen | TimedOut


class WaitPlan:
    """The timing of one wait: reads, listening, its deadline, and the grace during a Redis outage."""

    def __init__(
        self,
        now: float,
        timeout: float | None,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        reread_s: float = REREAD_S,
        outage_grace_s: float = OUTAGE_GRACE_S,
    ) -> None:
        self.deadline = None if timeout is None else now + timeout
        self.poll_interval_s = poll_interval_s
        self.reread_s = reread_s
        self.outage_grace_s = outage_grace_s
        self._next_read = now  # the first step reads
        self._last_read = -float("inf")
        self._outage_since: float | None = None

    def next_step(self, now: float) -> Step:
        """What to do at `now`. A read that is due comes first, even past the deadline, and a wait reads the
        records once more at its deadline: it never times out on a job whose end it only missed hearing."""
        final = self.deadline is not None and now >= self.deadline and self._last_read < self.deadline
        if now >= self._next_read or final:
            self._next_read, self._last_read = now + self.reread_s, now
            return Read()
        if self.deadline is not None and now >= self.deadline:
            return TimedOut()
        until = self._next_read if self.deadline is None else min(self._next_read, self.deadline)
        return Listen(until - now)

    def missed_events(self, now: float) -> None:
        """The subscription reconnected: events published meanwhile are lost, so the next step reads."""
        self._next_read = now

    def answered(self) -> None:
        """Redis answered the step: an outage, if there was one, is over."""
        self._outage_since = None

    def outage(self, now: float) -> bool:
        """Redis failed a step at `now`. True: ride it out (pause for a poll interval, subscribe again, read
        the records again: events sent meanwhile are lost). False: give up, because the outage has lasted
        the grace, or the deadline has passed."""
        if self._outage_since is None:
            self._outage_since = now
        if now - self._outage_since >= self.outage_grace_s:
            return False
        if self.deadline is not None and now >= self.deadline:
            return False
        self._next_read = now  # due as soon as the pause is over
        return True


def newer(status: JobStatus, than: JobStatus) -> bool:
    """Whether `status` is later news of a job than `than`: a later change, or the same instant and further
    on in the state order. Events buffered before a read can be older than the read."""
    return (status.updated_at or _EPOCH, status.state.rank) > (than.updated_at or _EPOCH, than.state.rank)


class FinishLine:
    """The jobs of a wait that have not finished yet: each one's final status is reported once."""

    def __init__(self, job_ids: Iterable[str]) -> None:
        self.pending = set(job_ids)

    def offer(self, status: JobStatus | None) -> JobStatus | None:
        """`status` if it is the end of a pending job (read or published), now reported; else None."""
        if status is None or status.job_id not in self.pending or not status.state.finished:
            return None
        self.pending.discard(status.job_id)
        return status


class Follow:
    """One job's statuses as a watcher reports them: each newer than the last, until the job is finished,
    and a heartbeat (None) after `heartbeat_s` without news."""

    def __init__(self, job_id: str, now: float, heartbeat_s: float | None = None) -> None:
        self.job_id, self.heartbeat_s = job_id, heartbeat_s
        self.last: JobStatus | None = None
        self._last_report = now

    def offer(self, status: JobStatus | None, now: float) -> JobStatus | None:
        """`status` if it is news of this job (now reported); else None. Other jobs' events are ignored."""
        if status is None or status.job_id != self.job_id:
            return None
        if self.last is not None and not newer(status, self.last):
            return None
        self.last, self._last_report = status, now
        return status

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.state.finished

    def heartbeat(self, now: float) -> bool:
        """Whether to send a heartbeat at `now` (nothing reported for `heartbeat_s`); counts it as sent."""
        if self.heartbeat_s is None or now - self._last_report < self.heartbeat_s:
            return False
        self._last_report = now
        return True
