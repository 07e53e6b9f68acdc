"""The one retry policy: which answers are retried, the broker's countdowns, and retries in place.

Pauses are recorded instead of taken (tenacity's sleep is replaced) and jitter is pinned through
`random.uniform`, so nothing here depends on timing.
"""

from __future__ import annotations

import random

import pytest
import tenacity

from varco.workers.net.retry import RETRY_STATUS, backoff_s, is_retryable_status, retry_within, spread_s, waits


class Flaky:
    """Fails with `error` the first `failures` calls, then returns "done"."""

    def __init__(self, failures: int, error: BaseException | None = None) -> None:
        self.failures, self.calls = failures, 0
        self.error = error or ConnectionError("store down")

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    taken: list[float] = []
    monkeypatch.setattr(tenacity.nap.time, "sleep", taken.append)
    return taken


@pytest.fixture
def jitter(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Every random.uniform(low, high) asked for, answered with `high`."""
    asked: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        asked.append((low, high))
        return high

    monkeypatch.setattr(random, "uniform", uniform)
    return asked


def test_which_statuses_are_retried() -> None:
    assert {408, 425, 429} == RETRY_STATUS
    retried = [s for s in range(100, 700) if is_retryable_status(s)]
    assert retried == [408, 425, 429, *range(500, 700)]


def test_backoff_doubles_from_base_with_up_to_half_off_and_a_cap(jitter: list[tuple[float, float]]) -> None:
    assert [backoff_s(n) for n in range(11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600]
    assert set(jitter) == {(0.5, 1.0)}
    assert backoff_s(3, base=0.5, cap=3.0) == 3.0 and backoff_s(2, base=0.5, cap=3.0) == 2.0


def test_spread_is_drawn_between_one_and_three_seconds_by_default(jitter: list[tuple[float, float]]) -> None:
    assert spread_s() == 3.0 and spread_s(0.1, 0.2) == 0.2
    assert jitter == [(1.0, 3.0), (0.1, 0.2)]


def test_waits_double_from_first_plus_jitter_up_to_the_cap(jitter: list[tuple[float, float]]) -> None:
    wait = waits(0.5, 20.0, jitter_s=0.25)
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    got = []
    for attempt in range(1, 9):
        state.attempt_number = attempt
        got.append(wait(state))
    assert got == [0.75, 1.25, 2.25, 4.25, 8.25, 16.25, 20.0, 20.0]
    assert set(jitter) == {(0, 0.25)}
    jitter.clear()
    waits(1.0, 5.0)(state)
    assert jitter == [(0, 1.0)]  # a second of jitter unless told otherwise


def test_retry_within_tries_until_success_with_short_doubling_pauses(
    pauses: list[float], jitter: list[tuple[float, float]]
) -> None:
    work = Flaky(failures=8)
    assert retry_within(60)(work) == "done"
    assert work.calls == 9
    # 0.2 s doubling plus the most jitter (1 s), never more than 5 s apart
    assert pauses == pytest.approx([1.2, 1.4, 1.8, 2.6, 4.2, 5.0, 5.0, 5.0])
    assert set(jitter) == {(0, 1.0)}


def test_retry_within_takes_first_cap_and_jitter(pauses: list[float], jitter: list[tuple[float, float]]) -> None:
    retry_within(60, first_s=0.5, cap_s=3.0, jitter_s=0.5)(Flaky(failures=4))
    assert pauses == pytest.approx([1.0, 1.5, 2.5, 3.0])


def test_past_the_deadline_the_last_error_is_raised_as_it_was(pauses: list[float]) -> None:
    work = Flaky(failures=5, error=TimeoutError("still down"))
    with pytest.raises(TimeoutError, match=r"^still down$"):
        retry_within(0)(work)
    assert work.calls == 1 and pauses == []


def test_only_errors_retry_if_accepts_are_retried(pauses: list[float]) -> None:
    permanent = Flaky(failures=3, error=KeyError("gone"))
    with pytest.raises(KeyError):
        retry_within(60, retry_if=lambda exc: isinstance(exc, ConnectionError))(permanent)
    assert permanent.calls == 1
    transient = Flaky(failures=2)
    assert retry_within(60, retry_if=lambda exc: isinstance(exc, ConnectionError))(transient) == "done"
    assert transient.calls == 3


def test_by_default_every_exception_is_retried_but_not_an_interrupt(pauses: list[float]) -> None:
    assert retry_within(60)(Flaky(failures=2, error=ValueError("odd answer"))) == "done"
    interrupted = Flaky(failures=2, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        retry_within(60)(interrupted)
    assert interrupted.calls == 1


def test_before_sleep_hears_of_each_failed_try_and_its_pause(pauses: list[float]) -> None:
    heard: list[tuple[int, str, float]] = []

    def note(state: tenacity.RetryCallState) -> None:
        heard.append((state.attempt_number, repr(state.outcome.exception()), state.upcoming_sleep))

    retry_within(60, jitter_s=0, before_sleep=note)(Flaky(failures=2))
    assert heard == [(1, "ConnectionError('store down')", 0.2), (2, "ConnectionError('store down')", 0.4)]


def test_attempts_can_be_looped_over(pauses: list[float]) -> None:
    work = Flaky(failures=1)
    for attempt in retry_within(60):
        with attempt:
            work()
    assert work.calls == 2
