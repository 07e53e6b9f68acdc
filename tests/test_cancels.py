"""The cancel watcher's local set: a second delivery of a running job, come and gone, leaves it watched."""

from __future__ import annotations

import redis

from varco.workers.cancels import CancelWatcher


def test_a_deferred_copy_does_not_unwatch_the_running_job() -> None:
    watcher = CancelWatcher(redis.Redis())  # not started: no connection is made
    watcher.watch("j")  # the run
    watcher.watch("j")  # a copy delivered to another thread of this process, deferred at once
    watcher.forget("j")
    watcher.mark("j")  # the user cancels while the run goes on
    assert watcher.is_cancelled("j")
    watcher.forget("j")
    assert not watcher.is_cancelled("j")
    watcher.mark("j")  # no run left here: ignored
    assert not watcher.is_cancelled("j")
