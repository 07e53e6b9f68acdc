"""Status records on a real redis-server: forward-only transitions, attempts, cancels, events, TTL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis

from varco.tasks.schemas import ErrorInfo, JobState
from varco.tasks.status import EVENTS_CHANNEL, StatusStore
from varco.workers.devtools.local_redis import LocalRedis, start_redis


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with start_redis(tmp_path_factory.mktemp("redis-status")) as s:
        yield s


@pytest.fixture
def store(server: LocalRedis) -> StatusStore:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    return StatusStore(client, ttl=120)


def test_forward_only(store: StatusStore) -> None:
    store.create("j1", "caption")
    assert store.begin_attempt("j1", "gpu0@a", max_attempts=3) == (JobState.STARTED, 1)
    assert store.transition("j1", JobState.SUCCEEDED, result_uri="s3://b/j1.json")
    # A redelivered message can never take the finished job back.
    assert not store.transition("j1", JobState.STARTED)
    assert not store.transition("j1", JobState.FAILED, error=ErrorInfo(type="X", message="late"))
    assert store.begin_attempt("j1", "gpu1@b", max_attempts=3) == (JobState.SUCCEEDED, 1)
    status = store.get("j1")
    assert status.state is JobState.SUCCEEDED and status.error is None and status.worker == "gpu0@a"
    assert status.result_uri == "s3://b/j1.json" and status.finished_at is not None


def test_started_and_retrying_alternate_but_never_return_to_queued(store: StatusStore) -> None:
    store.create("j2", "ocr")
    store.begin_attempt("j2", "w", 5)
    assert store.transition("j2", JobState.RETRYING, error=ErrorInfo(type="ImageFetchError", message="503"))
    assert store.begin_attempt("j2", "w", 5) == (JobState.STARTED, 2)
    assert not store.transition("j2", JobState.QUEUED)
    assert store.get("j2").error.type == "ImageFetchError"


def test_poison_after_max_attempts(store: StatusStore) -> None:
    store.create("j3", "caption")
    for n in (1, 2):
        assert store.begin_attempt("j3", "w", 2) == (JobState.STARTED, n)
    state, attempts = store.begin_attempt("j3", "w", 2)
    assert (state, attempts) == (JobState.FAILED, 3)
    assert store.get("j3").error.type == "PoisonMessageError"


def test_cancel_queued_and_running(store: StatusStore) -> None:
    store.create("q", "caption")
    assert store.request_cancel("q") is JobState.CANCELLED
    assert store.begin_attempt("q", "w", 3)[0] is JobState.CANCELLED  # never runs
    store.create("r", "caption")
    store.begin_attempt("r", "w", 3)
    assert store.request_cancel("r") is JobState.STARTED and store.cancel_requested("r")
    assert store.transition("r", JobState.CANCELLED)
    assert store.request_cancel("missing") is None


def test_cancel_before_first_delivery_wins(store: StatusStore) -> None:
    store.create("c", "caption")
    store.redis.hset(store.key("c"), "cancel_requested", "1")
    assert store.begin_attempt("c", "w", 3)[0] is JobState.CANCELLED


def test_every_change_is_published_and_records_expire(store: StatusStore) -> None:
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(EVENTS_CHANNEL)
    store.create("e", "vqa")
    store.begin_attempt("e", "w", 3)
    store.transition("e", JobState.SUCCEEDED, result_uri="file:///r/e.json")
    states = []
    for _ in range(20):
        message = pubsub.get_message(timeout=1)
        if message:
            states.append(json.loads(message["data"])["state"])
        if states[-1:] == ["succeeded"]:
            break
    assert states == ["started", "succeeded"]
    assert 0 < store.redis.ttl(store.key("e")) <= 120


def test_idempotency_key_binds_once(store: StatusStore) -> None:
    assert store.claim_idempotency_key("k", "a") == "a"
    assert store.claim_idempotency_key("k", "b") == "a"
    store.release_idempotency_key("k", "b")  # not the owner: no effect
    assert store.claim_idempotency_key("k", "c") == "a"


def test_a_live_lease_defers_other_deliveries_without_counting_them(store: StatusStore) -> None:
    store.create("l", "caption")
    assert store.claim("l", "gpu0@a", 3, token="run-1", lease_s=30) == (JobState.STARTED, 1, 0.0)
    other = store.claim("l", "gpu1@b", 3, token="run-2", lease_s=30)
    assert other.state is None and other.attempts == 1 and 25 < other.leased_s <= 30  # told to wait
    assert store.get("l").attempts == 1 and store.get("l").worker == "gpu0@a"
    assert store.renew_leases({"l": "run-1", "missing": "x"}, 60) == 1
    assert 55 < store.claim("l", "gpu1@b", 3, token="run-2", lease_s=30).leased_s <= 60
    assert store.renew_leases({"l": "run-2"}, 60) == 0  # only the holder renews
    store.release_lease("l", "run-2")  # not the holder: no effect
    assert store.claim("l", "gpu1@b", 3, token="run-2", lease_s=30).state is None
    store.release_lease("l", "run-1")  # handed back (a job going to a retry): the next delivery runs
    assert store.claim("l", "gpu1@b", 3, token="run-2", lease_s=30) == (JobState.STARTED, 2, 0.0)


def test_a_lapsed_lease_lets_the_next_delivery_run(store: StatusStore) -> None:
    store.create("d", "caption")
    store.claim("d", "gpu0@a", 3, token="dead", lease_s=0.2)
    time.sleep(0.3)  # the holder died: nothing renewed it
    assert store.claim("d", "gpu1@b", 3, token="next", lease_s=30) == (JobState.STARTED, 2, 0.0)


def test_the_terminal_transition_ends_the_lease_and_clears_the_error(store: StatusStore) -> None:
    store.create("s", "ocr")
    store.claim("s", "w", 3, token="t", lease_s=30)
    store.transition("s", JobState.RETRYING, error=ErrorInfo(type="ResultStoreError", message="S3 down"))
    assert store.transition("s", JobState.SUCCEEDED, result_uri="s3://b/s.json")
    record = store.record("s")
    assert "error" not in record and "lease_owner" not in record and "lease_until" not in record
    assert store.get("s").error is None


def test_a_vanished_record_is_recreated_only_by_a_terminal_transition_that_asks(store: StatusStore) -> None:
    assert not store.transition("v", JobState.SUCCEEDED, result_uri="s3://b/v.json")
    assert not store.transition("v", JobState.RETRYING, recreate_task="caption")
    assert store.get("v") is None
    assert store.transition("v", JobState.SUCCEEDED, recreate_task="caption", result_uri="s3://b/v.json")
    status = store.get("v")
    assert (status.job_id, status.task, status.state, status.result_uri) == (
        "v", "caption", JobState.SUCCEEDED, "s3://b/v.json")  # fmt: skip
    assert 0 < store.redis.ttl(store.key("v")) <= 120
