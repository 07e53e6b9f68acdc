"""GroupCommit: concurrent calls go out together, each caller gets its own answer or its flush's error."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from varco.tasks.group_commit import GroupCommit


def test_a_lone_call_is_flushed_at_once_by_itself() -> None:
    seen: list[list[int]] = []
    group = GroupCommit(lambda items: seen.append(list(items)) or [i * 10 for i in items])
    assert group.call(4) == 40 and group.call(5) == 50
    assert seen == [[4], [5]] and (group.flushes, group.items) == (2, 2)


def test_calls_that_arrive_during_a_flush_go_out_together_and_each_gets_its_own_answer() -> None:
    entered, release = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def flush(items: list[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:  # the first flush is held until every other caller is waiting behind it
            entered.set()
            release.wait(10)
        return [-i for i in items]

    group = GroupCommit(flush)
    with ThreadPoolExecutor(20) as pool:
        first = pool.submit(group.call, 0)
        assert entered.wait(10)
        rest = [pool.submit(group.call, i) for i in range(1, 20)]
        deadline = time.monotonic() + 10
        while len(group._pending) < 19 and time.monotonic() < deadline:  # all queued behind the flush
            time.sleep(0.01)
        release.set()
        assert first.result(10) == 0 and [f.result(10) for f in rest] == [-i for i in range(1, 20)]
    assert batches[0] == [0] and sorted(batches[1]) == list(range(1, 20)) and len(batches) == 2


def test_a_flush_that_fails_raises_in_each_of_its_callers_and_the_next_flush_still_runs() -> None:
    calls = 0

    def flush(items: list[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("redis went away")
        return items

    group = GroupCommit(flush)
    with pytest.raises(ConnectionError):
        group.call("a")
    assert group.call("b") == "b"


def test_a_flush_never_takes_more_than_max_batch() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def flush(items: list[int]) -> list[int]:
        sizes.append(len(items))
        gate.wait(10)
        return items

    group = GroupCommit(flush, max_batch=4)
    with ThreadPoolExecutor(11) as pool:
        futures = [pool.submit(group.call, i) for i in range(11)]
        time.sleep(0.3)
        gate.set()
        assert sorted(f.result(10) for f in futures) == list(range(11))
    assert max(sizes) <= 4 and sum(sizes) == 11
