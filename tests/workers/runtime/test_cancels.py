"""Cancellation bookkeeping in a worker process: the local set the engine polls, fed by `varco:cancel`
pub/sub on a real redis-server."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from varco.tasks.status import CANCEL_CHANNEL
from varco.workers.devtools.local_redis import LocalRedis, answers, start_redis
from varco.workers.runtime.cancels import CancelWatcher


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalRedis]:
    with start_redis(tmp_path) as s:
        yield s


@pytest.fixture
def client(server: LocalRedis) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(server.url, decode_responses=True)
    yield c
    c.close()


@pytest.fixture
def watcher(client: redis.Redis) -> Iterator[CancelWatcher]:
    w = CancelWatcher(client).start()
    until(lambda: client.pubsub_numsub(CANCEL_CHANNEL)[0][1] == 1, "the watcher never subscribed")
    yield w
    w.stop()


def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_cancel_for_a_watched_job_is_seen(client: redis.Redis, watcher: CancelWatcher) -> None:
    watcher.watch("job-a")
    assert not watcher.is_cancelled("job-a")
    client.publish(CANCEL_CHANNEL, "job-a")
    until(lambda: watcher.is_cancelled("job-a"), "the cancel never reached the watcher")
    assert not watcher.is_cancelled("job-b")


def test_the_listener_is_a_named_daemon_thread(watcher: CancelWatcher) -> None:
    # A daemon: it never holds up the worker process's exit; named, so it reads in thread dumps and logs.
    assert watcher._thread.daemon is True and watcher._thread.name == "cancel-watcher"


def test_the_subscribe_confirmation_is_not_a_cancel(client: redis.Redis) -> None:
    w = CancelWatcher(client)
    w.watch("1")  # what the confirmation's data (the subscription count, 1) would read as
    w.watch("barrier")
    w.start()
    try:
        until(lambda: client.pubsub_numsub(CANCEL_CHANNEL)[0][1] == 1, "the watcher never subscribed")
        client.publish(CANCEL_CHANNEL, "barrier")  # handled after the confirmation
        until(lambda: w.is_cancelled("barrier"), "the cancel never reached the watcher")
        assert not w.is_cancelled("1")
    finally:
        w.stop()


def test_cancels_for_other_processes_jobs_are_ignored(client: redis.Redis, watcher: CancelWatcher) -> None:
    watcher.watch("mine")
    client.publish(CANCEL_CHANNEL, "theirs")
    client.publish(CANCEL_CHANNEL, "mine")  # messages arrive in order: once this is seen, "theirs" was handled
    until(lambda: watcher.is_cancelled("mine"), "the cancel never reached the watcher")
    assert not watcher.is_cancelled("theirs") and not watcher.is_cancelled("1")
    watcher.watch("theirs")  # a cancel that came before the job was watched is not replayed here
    assert not watcher.is_cancelled("theirs")


def test_mark_only_counts_watched_jobs_and_forget_clears_both() -> None:
    w = CancelWatcher(redis.Redis())  # never started: the bookkeeping alone
    w.mark("x")
    assert not w.is_cancelled("x")
    w.watch("x")
    w.mark("x")
    assert w.is_cancelled("x")
    w.forget("x")
    assert not w.is_cancelled("x")
    w.mark("x")  # forgotten: no longer this process's job
    assert not w.is_cancelled("x")


def test_stop_ends_the_listener(watcher: CancelWatcher) -> None:
    watcher.stop()
    watcher._thread.join(timeout=10)
    assert not watcher._thread.is_alive()


def test_the_listener_reconnects_after_redis_restarts(
    server: LocalRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    watcher = CancelWatcher(client).start()
    watcher.watch("after-restart")
    until(lambda: client.pubsub_numsub(CANCEL_CHANNEL)[0][1] == 1, "the watcher never subscribed")
    server.stop()
    argv = [shutil.which("redis-server") or "redis-server", "--port", str(server.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]  # fmt: skip
    again = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until(lambda: answers(server.url, 0.2), "redis did not come back")
        # Publish until the watcher has resubscribed and seen it (a message sent before that is lost).
        until(lambda: client.publish(CANCEL_CHANNEL, "after-restart") >= 0 and watcher.is_cancelled("after-restart"),
              "the watcher never came back", timeout=60)  # fmt: skip
    finally:
        watcher.stop()
        again.terminate()
        again.wait(timeout=10)
        client.close()
    lost = [r.getMessage() for r in caplog.records if r.name.endswith("workers.runtime.cancels")]
    assert lost and all(m.startswith("cancel listener lost Redis (") for m in lost), lost
    assert any("ConnectionError" in m for m in lost) and all(m.endswith("); reconnecting") for m in lost), lost


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
