"""Status records on a real redis-server: forward-only transitions, attempts, cancels, events, TTL, owners;
and AsyncStatusStore reading the same records from asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from varco.tasks import keys
from varco.tasks.async_status import AsyncStatusStore
from varco.tasks.requests import IdempotencyKeyReused
from varco.tasks.schemas import ErrorInfo, JobState, JobStatus
from varco.tasks.status import CANCEL_CHANNEL, EVENTS_CHANNEL, StatusStore, parse_events, record_to_status
from varco.workers.devtools.local_redis import LocalRedis

T = TypeVar("T")


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
    store.create("c", "caption", cancel_requested="1")  # a cancel's flag on a record still queued
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


def test_a_thread_knows_its_terminal_transition_ended_the_lease_until_its_next_claim(store: StatusStore) -> None:
    # LeaseKeeper skips the release (2 Redis commands) only when this says the lease is gone already.
    store.create("le", "ocr")
    store.claim("le", "w", 3, token="t1", lease_s=30)
    assert not store.lease_ended_here("le")
    store.transition("le", JobState.RETRYING)  # not terminal: the lease stays, a release is needed
    assert not store.lease_ended_here("le") and store.record("le")["lease_owner"] == "t1"
    other: list[bool] = []
    assert store.transition("le", JobState.SUCCEEDED, result_uri="s3://b/le.json")
    thread = threading.Thread(target=lambda: other.append(store.lease_ended_here("le")))
    thread.start()
    thread.join()
    assert store.lease_ended_here("le") and other == [False] and "lease_owner" not in store.record("le")
    assert not store.transition("le", JobState.FAILED) and store.lease_ended_here("le")
    store.create("le", "ocr")  # the same thread runs a new delivery of it: a new lease, not ended
    store.claim("le", "w", 3, token="t2", lease_s=30)
    assert not store.lease_ended_here("le")


def test_a_vanished_record_is_recreated_only_by_a_terminal_transition_that_asks(store: StatusStore) -> None:
    assert not store.transition("v", JobState.SUCCEEDED, result_uri="s3://b/v.json")
    assert not store.transition("v", JobState.RETRYING, recreate_task="caption")
    assert store.get("v") is None
    assert store.transition("v", JobState.SUCCEEDED, recreate_task="caption", result_uri="s3://b/v.json")
    status = store.get("v")
    assert (status.job_id, status.task, status.state, status.result_uri) == (
        "v", "caption", JobState.SUCCEEDED, "s3://b/v.json")  # fmt: skip
    assert status.created_at is not None and status.finished_at is not None
    assert 0 < store.redis.ttl(store.key("v")) <= 120


def test_an_idempotency_key_bound_to_another_request_is_refused(store: StatusStore) -> None:
    assert store.claim_idempotency_key("k", "a", "fp-ocr") == "a"
    assert store.claim_idempotency_key("k", "b", "fp-ocr") == "a"  # the same request: its first job
    with pytest.raises(IdempotencyKeyReused) as reused:
        store.claim_idempotency_key("k", "c", "fp-grounding")
    assert reused.value.first_job_id == "a" and reused.value.field == "idempotency_key"
    assert store.idempotency_conflicts([("k", "fp-ocr"), ("k", "fp-grounding"), ("free", "fp")]) == [None, "a", None]
    store.release_idempotency_key("k", "a")  # the owner still frees it (a failed enqueue)
    assert store.claim_idempotency_key("k", "d", "fp-grounding") == "d"


def test_records_and_idempotency_keys_live_under_the_varco_prefix(store: StatusStore) -> None:
    # Operators, the Sentinel fail-over test and `redis-cli --scan` find jobs by these key names.
    store.create("p", "caption")
    assert store.redis.exists("varco:job:p") == 1
    store.claim_idempotency_key("k", "p")
    assert store.redis.get("varco:idem:k") == "p"


def test_a_new_record_is_queued_with_its_task_no_attempts_and_timestamps(store: StatusStore) -> None:
    store.create("n", "ocr", owner="team-a")
    status = store.get("n")
    assert (status.job_id, status.state, status.task, status.attempts) == ("n", JobState.QUEUED, "ocr", 0)
    assert status.created_at is not None and status.created_at == status.updated_at
    assert store.record("n")["attempts"] == "0" and store.record("n")["owner"] == "team-a"
    # Timestamps carry their UTC offset, so they compare with other aware times (the job page, webhooks).
    assert status.created_at.utcoffset() == timedelta(0)
    assert 0 < store.redis.ttl(store.key("n")) <= 120


def test_delete_removes_the_record(store: StatusStore) -> None:
    store.create("x", "caption")
    store.create("y", "caption")
    store.delete("x")
    assert store.get("x") is None and store.get("y") is not None


def test_get_many_answers_each_id_in_order_with_none_for_a_missing_one(store: StatusStore) -> None:
    store.create("a", "caption")
    store.create("b", "ocr")
    store.transition("b", JobState.CANCELLED)
    statuses = store.get_many(["b", "gone", "a"])
    assert list(statuses) == ["b", "gone", "a"]
    assert statuses["gone"] is None
    assert (statuses["a"].task, statuses["a"].state) == ("caption", JobState.QUEUED)
    assert (statuses["b"].task, statuses["b"].state) == ("ocr", JobState.CANCELLED)
    assert store.get_many([]) == {}


def test_an_empty_field_reads_as_unset() -> None:
    status = record_to_status({"job_id": "e", "state": "started", "worker": "", "started_at": "", "attempts": ""})
    assert (status.worker, status.started_at, status.attempts) == (None, None, 0)


def test_a_published_event_parses_to_the_status_and_anything_else_to_none(store: StatusStore) -> None:
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(EVENTS_CHANNEL)
    store.create("ev", "caption")
    store.transition("ev", JobState.FAILED, error=ErrorInfo(type="ImageFetchError", message="404"))
    message = None
    for _ in range(20):
        if message := pubsub.get_message(timeout=1):
            break
    [event] = parse_events(message["data"])
    assert (event.job_id, event.task, event.state, event.error.type) == (
        "ev", "caption", JobState.FAILED, "ImageFetchError")  # fmt: skip
    # Anyone who can reach Redis can publish on the channel: a stray message is skipped, not a crash.
    for stray in ("not json", "1", "null", "[]", '{"job_id": "ev"}', '{"job_id": "ev", "state": "lost"}', "[1, null]"):
        assert parse_events(stray) == [], stray


def test_a_poison_message_says_why_it_failed(store: StatusStore) -> None:
    store.create("pm", "caption")
    for _ in range(3):
        store.begin_attempt("pm", "w", 2)
    assert store.get("pm").error == ErrorInfo(
        type="PoisonMessageError",
        message="job was delivered more than 2 times without finishing (a worker crashed or ran out of memory on it)",
    )


def test_a_delivery_counted_without_a_token_holds_no_lease(store: StatusStore) -> None:
    store.create("nl", "caption")
    assert store.begin_attempt("nl", "w", 3) == (JobState.STARTED, 1)
    assert "lease_owner" not in store.record("nl") and "lease_until" not in store.record("nl")
    assert store.claim("nl", "w2", 3, token="run-2", lease_s=30) == (JobState.STARTED, 2, 0.0)


def test_a_deferred_delivery_waits_no_longer_than_the_lease_has_left(store: StatusStore) -> None:
    store.create("sl", "caption")
    store.claim("sl", "gpu0@a", 3, token="run-1", lease_s=600)
    other = store.claim("sl", "gpu1@b", 3, token="run-2", lease_s=30)
    # Told to wait what the first lease has left (no machine stalls for 100 s between two calls), not its own.
    assert other.state is None and 500 < other.leased_s <= 600


def test_a_lease_defers_a_delivery_to_its_last_fraction_of_a_second(store: StatusStore) -> None:
    # A 0.9 s lease, redelivered at once: the redelivery must wait, though under a second is left. Each try
    # times the pair; only a try that took under 0.8 s is judged (its lease surely still lived), and at
    # least one must be, so a stalled machine makes the test retry, never pass without checking.
    judged = 0
    for n in range(20):
        job_id = f"fr{n}"
        store.create(job_id, "caption")
        before = time.monotonic()
        store.claim(job_id, "gpu0@a", 3, token="run-1", lease_s=0.9)
        other = store.claim(job_id, "gpu1@b", 3, token="run-2", lease_s=30)
        if time.monotonic() - before < 0.8:
            assert other.state is None and 0 < other.leased_s < 0.9, other
            judged += 1
        if judged == 3:
            break
    assert judged == 3, "the machine never made two Redis calls within 0.8 s"


def test_renewing_no_leases_renews_none(store: StatusStore) -> None:
    assert store.renew_leases({}, 30) == 0


def test_an_idempotency_key_expires_with_the_records(store: StatusStore) -> None:
    store.claim_idempotency_key("ttl", "a")
    assert 0 < store.redis.ttl("varco:idem:ttl") <= 120


def test_the_owner_releasing_its_idempotency_key_frees_it(store: StatusStore) -> None:
    # A submit whose enqueue failed releases its key, so the caller's retry makes a new job.
    assert store.claim_idempotency_key("r", "a") == "a"
    store.release_idempotency_key("r", "a")
    assert store.claim_idempotency_key("r", "b") == "b"


def _next_message(pubsub: redis.client.PubSub) -> str:
    for _ in range(20):
        if message := pubsub.get_message(timeout=1):
            return message["data"]
    raise AssertionError("nothing published")


@pytest.mark.parametrize("end", [JobState.FAILED, JobState.CANCELLED, JobState.SUCCEEDED])
def test_every_end_is_final(store: StatusStore, end: JobState) -> None:
    store.create("f", "caption")
    store.begin_attempt("f", "w", 3)
    assert store.transition("f", end)
    for later in (JobState.SUCCEEDED, JobState.FAILED, JobState.RETRYING, JobState.STARTED):
        assert not store.transition("f", later)
    assert store.begin_attempt("f", "w", 3) == (end, 1)  # a redelivery neither runs nor counts
    assert store.get("f").state is end


def test_each_step_stamps_its_time(store: StatusStore) -> None:
    store.create("t", "caption")
    store.begin_attempt("t", "gpu0@a", 3)
    started = store.get("t")
    assert started.started_at is not None and started.updated_at == started.started_at > started.created_at
    store.transition("t", JobState.SUCCEEDED, result_uri="s3://b/t.json")
    done = store.get("t")
    assert done.finished_at is not None and done.updated_at == done.finished_at > done.started_at


def test_a_delivery_whose_record_vanished_makes_it_anew(store: StatusStore) -> None:
    # Redis lost the record (restart without persistence) while the message waited in the queue.
    assert store.begin_attempt("m", "gpu0@a", 3) == (JobState.STARTED, 1)
    status = store.get("m")
    assert (status.job_id, status.state, status.worker) == ("m", JobState.STARTED, "gpu0@a")
    assert status.created_at is not None
    assert 0 < store.redis.ttl(store.key("m")) <= 120


def test_a_delivery_that_fails_or_is_cancelled_at_its_claim_is_stamped_finished(store: StatusStore) -> None:
    store.create("pf", "caption")
    for _ in range(2):
        store.begin_attempt("pf", "w", 1)
    assert store.get("pf").state is JobState.FAILED and store.get("pf").finished_at is not None
    store.create("cf", "caption", cancel_requested="1")
    store.begin_attempt("cf", "w", 3)
    assert store.get("cf").state is JobState.CANCELLED and store.get("cf").finished_at is not None


def test_the_lease_holder_is_never_told_to_wait_on_itself(store: StatusStore) -> None:
    store.create("own", "caption")
    store.claim("own", "gpu0@a", 3, token="run-1", lease_s=30)
    assert store.claim("own", "gpu0@a", 3, token="run-1", lease_s=30) == (JobState.STARTED, 2, 0.0)


def test_a_lease_is_timed_on_the_redis_clock(store: StatusStore) -> None:
    def redis_now() -> float:
        seconds, micros = store.redis.time()
        return seconds + micros / 1e6

    store.create("rc", "caption")
    before = redis_now()
    store.claim("rc", "w", 3, token="run-1", lease_s=30)
    after = redis_now()
    # To the millisecond (Lua writes it with 14 digits): a lease is as long as asked, never a second short.
    assert before + 30 - 1e-3 <= float(store.record("rc")["lease_until"]) <= after + 30 + 1e-3


def test_renewal_extends_each_held_lease_of_a_running_or_retrying_job(store: StatusStore) -> None:
    for job_id in ("ra", "rb"):
        store.create(job_id, "caption")
        store.claim(job_id, "w", 3, token=f"{job_id}-run", lease_s=30)
    # A run that handed its job to a retry still holds the lease until it releases it.
    store.transition("rb", JobState.RETRYING, error=ErrorInfo(type="ImageFetchError", message="503"))
    store.redis.expire(store.key("ra"), 5)
    assert store.renew_leases({"ra": "ra-run", "rb": "rb-run"}, 60) == 2
    for job_id in ("ra", "rb"):
        assert 55 < store.claim(job_id, "w2", 3, token="other", lease_s=30).leased_s <= 60
    assert store.redis.ttl(store.key("ra")) > 5  # a long run's record does not expire under it


def test_releasing_a_lease_clears_it_from_the_record(store: StatusStore) -> None:
    store.create("rl", "caption")
    store.claim("rl", "w", 3, token="run-1", lease_s=30)
    store.release_lease("rl", "run-1")
    record = store.record("rl")
    assert "lease_owner" not in record and "lease_until" not in record and record["state"] == "started"
    assert 0 < store.redis.ttl(store.key("rl")) <= 120  # the record keeps its TTL


def test_a_claim_refreshes_the_record_ttl(store: StatusStore) -> None:
    store.create("tt", "caption")
    store.redis.expire(store.key("tt"), 5)
    store.begin_attempt("tt", "w", 3)
    assert store.redis.ttl(store.key("tt")) > 5


def test_cancelling_a_finished_job_changes_nothing(store: StatusStore) -> None:
    store.create("fin", "caption")
    store.transition("fin", JobState.SUCCEEDED, result_uri="s3://b/fin.json")
    before = store.record("fin")
    assert store.request_cancel("fin") is JobState.SUCCEEDED
    assert store.record("fin") == before and not store.cancel_requested("fin")


@pytest.mark.parametrize("waiting", [JobState.QUEUED, JobState.RETRYING])
def test_a_waiting_job_is_cancelled_at_once_and_waiters_are_told(store: StatusStore, waiting: JobState) -> None:
    store.create("w", "caption")
    if waiting is JobState.RETRYING:
        store.begin_attempt("w", "gpu0@a", 3)
        store.transition("w", JobState.RETRYING, error=ErrorInfo(type="ImageFetchError", message="503"))
    store.redis.expire(store.key("w"), 5)
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(EVENTS_CHANNEL)
    assert store.request_cancel("w") is JobState.CANCELLED
    [event] = parse_events(_next_message(pubsub))
    assert (event.job_id, event.state) == ("w", JobState.CANCELLED)
    status = store.get("w")
    assert status.state is JobState.CANCELLED and status.finished_at is not None
    assert status.updated_at == status.finished_at
    assert store.redis.ttl(store.key("w")) > 5
    assert store.begin_attempt("w", "gpu1@b", 3)[0] is JobState.CANCELLED  # a later delivery never runs it


def test_cancelling_a_running_job_tells_its_worker(store: StatusStore) -> None:
    store.create("run", "caption")
    store.begin_attempt("run", "gpu0@a", 3)
    started = store.get("run").updated_at
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CANCEL_CHANNEL)
    assert store.request_cancel("run") is JobState.STARTED
    assert _next_message(pubsub) == "run"  # the worker's CancelWatcher stops generating on this
    status = store.get("run")
    assert status.state is JobState.STARTED and store.cancel_requested("run") and status.updated_at > started


def test_a_job_is_seen_only_by_its_owner(store: StatusStore) -> None:
    store.create("mine", "caption", owner="alice")
    store.create("nobodys", "caption", owner="")  # an empty owner is no owner
    assert store.get_owned("mine", "alice").job_id == "mine"
    assert store.get_owned("mine", None).job_id == "mine"  # no owner asked: anyone's job
    assert store.get_owned("mine", "bob") is None  # the same answer as for an unknown job
    assert store.get_owned("unknown", "alice") is None and store.get_owned("unknown", None) is None
    assert "owner" not in store.record("nobodys") and store.get_owned("nobodys", "") is None


def test_an_event_feed_reads_each_published_status(store: StatusStore) -> None:
    feed = store.events()
    try:
        store.create("f", "caption")
        store.begin_attempt("f", "gpu0@a", 3)
        store.redis.publish(EVENTS_CHANNEL, "not a status")
        seen = [feed.next(1.0) for _ in range(4)]  # the subscribe confirmation is no message either
        started = [s for s in seen if s is not None]
        assert [(s.job_id, s.state, s.worker) for s in started] == [("f", JobState.STARTED, "gpu0@a")]
        assert feed.next(0.0) is None  # nothing more
    finally:
        feed.close()
    feed.close()  # closing twice is harmless


def on_asyncio(server: LocalRedis, use: Callable[[AsyncStatusStore], Awaitable[T]]) -> T:
    async def run() -> T:
        statuses = AsyncStatusStore(aioredis.Redis.from_url(server.url, decode_responses=True))
        try:
            return await use(statuses)
        finally:
            await statuses.aclose()

    return asyncio.run(run())


def test_get_and_get_owned_read_what_status_store_wrote(server: LocalRedis, store: StatusStore) -> None:
    store.create("a", "ocr", owner="alice")
    store.begin_attempt("a", "gpu0@x", 3)

    async def read(statuses: AsyncStatusStore) -> list[JobStatus | None]:
        await statuses.ping()
        return [await statuses.get("a"), await statuses.get_owned("a", "alice"), await statuses.get_owned("a", "bob"),
                await statuses.get_owned("a", None), await statuses.get("missing")]  # fmt: skip

    mine, owned, theirs, anyones, missing = on_asyncio(server, read)
    assert (mine.state, mine.task, mine.worker, mine.attempts) == (JobState.STARTED, "ocr", "gpu0@x", 1)
    assert owned == anyones == mine and theirs is None and missing is None


def test_events_are_the_published_statuses(server: LocalRedis, store: StatusStore) -> None:
    store.create("e", "caption")

    async def follow(statuses: AsyncStatusStore) -> list[JobStatus]:
        feed = await statuses.events("e")
        try:
            await asyncio.to_thread(store.create, "other", "caption")
            await asyncio.to_thread(store.begin_attempt, "other", "gpu0@a", 3)  # another job's: not in this feed
            await asyncio.to_thread(store.transition, "e", JobState.SUCCEEDED, result_uri="file:///r/e.json")
            await asyncio.to_thread(store.redis.publish, EVENTS_CHANNEL, "[1]")  # anyone may publish there
            seen = [await feed.next(1.0) for _ in range(4)]
        finally:
            await feed.aclose()
        await feed.aclose()  # closing twice is harmless
        return [s for s in seen if s is not None]

    [done] = on_asyncio(server, follow)
    assert (done.job_id, done.state, done.result_uri) == ("e", JobState.SUCCEEDED, "file:///r/e.json")


def test_the_terminal_webhook_mark(store: StatusStore) -> None:
    store.create("tw", "caption")
    store.transition("tw", JobState.SUCCEEDED, result_uri="s3://b/tw.json")
    before = store.record("tw")
    assert not store.terminal_webhook_sent("tw")
    store.mark_terminal_webhook("tw")
    assert store.terminal_webhook_sent("tw")
    assert store.record("tw") == before  # the record is not rewritten: the mark is a key of its own
    assert 0 < store.redis.ttl(keys.terminal_webhook("tw")) <= 120  # it expires with the status TTL
    store.mark_terminal_webhook("gone")  # a record that expired meanwhile: the mark still expires
    assert 0 < store.redis.ttl(keys.terminal_webhook("gone")) <= 120
    assert not store.terminal_webhook_sent("never")


def test_an_event_feed_says_once_when_redis_py_subscribed_it_again(store: StatusStore) -> None:
    feed = store.events()
    assert not feed.resubscribed()
    store.redis.client_kill_filter(_type="pubsub")  # the subscription drops
    deadline = time.monotonic() + 30
    while store.redis.pubsub_numsub(EVENTS_CHANNEL)[0][1] == 0:  # redis-py reconnects it on a later read
        assert time.monotonic() < deadline, "redis-py never subscribed again"
        with contextlib.suppress(redis.ConnectionError):
            feed.next(0.1)
    assert feed.resubscribed()  # what was published while it was down is lost: a wait reads the records
    assert not feed.resubscribed()
    feed.close()


def test_the_state_alone_is_read_for_a_check(store: StatusStore) -> None:
    assert store.state("nope") is None
    store.create("st", "caption")
    assert store.state("st") is JobState.QUEUED
    store.claim("st", "w", 3, token="t", lease_s=30)
    store.transition("st", JobState.CANCELLED)
    assert store.state("st") is JobState.CANCELLED


def _calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_").upper(): v["calls"] for k, v in stats.items() if "config" not in k}


def test_each_change_of_a_record_is_one_read_and_one_write_with_its_ttl(store: StatusStore) -> None:
    """The record is one JSON string: its creation is one SET with the TTL, a claim or an end one GET and one
    SET (no HSET, HDEL, EXPIRE apart), and a wait's read of many records one MGET (docs/redis.md#cost-per-job)."""
    store.redis.config_resetstat()
    store.create("one", "caption")
    store.create("two", "caption")
    assert store.claim("one", "w", 3, token="t", lease_s=30).state is JobState.STARTED
    assert store.transition("one", JobState.SUCCEEDED, result_uri="s3://b/one.json")
    assert store.get_many(["one", "two"])["one"].state is JobState.SUCCEEDED
    calls = _calls(store.redis)
    calls.pop("INFO", None)
    assert calls == {"SET": 4, "GET": 2, "EVALSHA": 2, "TIME": 1, "PUBLISH": 2, "MGET": 1}
    assert 0 < store.redis.ttl(store.key("one")) <= 120 and 0 < store.redis.ttl(store.key("two")) <= 120


def test_a_record_of_the_hash_layout_is_read_and_moved_on_as_before(store: StatusStore, server: LocalRedis) -> None:
    """A rolling upgrade (workers first): records a Client before 2026-12-06 made are hashes. Every reader and
    script still takes them, and writes them back as hashes, so the older Client that submitted the job (which
    reads with HGETALL) still follows it."""

    def old_record(job_id: str, **fields: str) -> None:
        record = {"job_id": job_id, "state": "queued", "task": "caption", "attempts": "0",
                  "created_at": "2026-12-05T00:00:00+00:00", "updated_at": "2026-12-05T00:00:00+00:00"}  # fmt: skip
        store.redis.hset(store.key(job_id), mapping=record | fields)
        store.redis.expire(store.key(job_id), 120)

    old_record("h1", owner="team-a")
    assert store.get("h1").state is JobState.QUEUED and store.state("h1") is JobState.QUEUED
    assert store.get_owned("h1", "team-a") is not None and store.get_owned("h1", "team-b") is None
    assert store.get_many(["h1", "nope"])["h1"].job_id == "h1"
    assert store.claim("h1", "w", 3, token="t1", lease_s=30) == (JobState.STARTED, 1, 0.0)
    assert store.redis.type(store.key("h1")) == "hash" and store.record("h1")["owner"] == "team-a"
    assert store.redis.hgetall(store.key("h1"))["state"] == "started"  # what the older Client reads
    assert 0 < store.redis.ttl(store.key("h1")) <= 120
    old_record("h2", state="started", attempts="1", lease_owner="t2", lease_until="9999999999")
    assert store.renew_leases({"h2": "t2"}, 30) == 1
    old_record("h3", state="started", attempts="1", lease_owner="t3", lease_until="9999999999")
    store.release_lease("h3", "t3")
    assert "lease_owner" not in store.record("h3") and store.redis.ttl(store.key("h3")) > 0
    old_record("h4")
    assert store.request_cancel("h4") is JobState.CANCELLED
    old_record("h5", state="started", attempts="1", lease_owner="t5", lease_until="9999999999")
    assert store.transition("h5", JobState.SUCCEEDED, result_uri="s3://b/h5.json") and store.get("h5").result_uri
    assert store.redis.hget(store.key("h5"), "state") == "succeeded" and "lease_owner" not in store.record("h5")
    assert asyncio.run(_async_get(server.url, "h6")) is None
    old_record("h6")
    assert asyncio.run(_async_get(server.url, "h6")).state is JobState.QUEUED


async def _async_get(url: str, job_id: str) -> JobStatus | None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return await AsyncStatusStore(client).get(job_id)
    finally:
        await client.aclose()


def test_claims_and_ends_of_many_jobs_share_one_script_call_and_one_event_message(store: StatusStore) -> None:
    """What the GroupCommit hands the store from many threads at once: one EVALSHA, one clock read and one
    PUBLISH (a JSON array) for all of them, and each job's own answer, as a call of its own would give it."""
    for job in ("b1", "b2", "b3", "b4"):
        store.create(job, "caption")
    store.claim("b3", "w", 3, token="other", lease_s=30)  # a live lease elsewhere: b3 must wait
    store.transition("b4", JobState.CANCELLED)  # finished: neither run nor counted
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(EVENTS_CHANNEL)
    store.redis.config_resetstat()
    poison = ErrorInfo(type="PoisonMessageError", message="x").model_dump_json()
    claims = store._claim_many([
        [store.key(job), "3", "120", "2026-12-06T00:00:00+00:00", "w", poison, job, "mine", "30"]
        for job in ("b1", "b2", "b3", "b4")
    ])  # fmt: skip
    assert [c[:2] for c in claims] == [("started", 1), ("started", 1), ("leased", 1), ("cancelled", 0)]
    assert float(claims[2][2]) > 0
    ends = store._transition_many([
        (store.key("b1"), ["succeeded", "120", "2026-12-06T00:00:01+00:00", "0", "result_uri", "s3://b/b1.json"]),
        (store.key("b2"), ["failed", "120", "2026-12-06T00:00:01+00:00", "0"]),
        (store.key("b1"), ["failed", "120", "2026-12-06T00:00:01+00:00", "0"]),  # the same job again: it has ended
    ])  # fmt: skip
    assert ends == [(1, "succeeded"), (1, "failed"), (0, "succeeded")]
    calls = _calls(store.redis)
    assert (calls["EVALSHA"], calls["TIME"], calls["PUBLISH"]) == (2, 1, 2)
    claimed, ended = parse_events(_next_message(pubsub)), parse_events(_next_message(pubsub))
    assert [(s.job_id, s.state) for s in claimed] == [("b1", JobState.STARTED), ("b2", JobState.STARTED)]
    assert [(s.job_id, s.state) for s in ended] == [("b1", JobState.SUCCEEDED), ("b2", JobState.FAILED)]
    assert store.get("b1").result_uri == "s3://b/b1.json" and "lease_owner" not in store.record("b1")


def test_threads_that_claim_and_end_at_once_go_out_together(store: StatusStore) -> None:
    jobs = [f"t{i}" for i in range(24)]
    for job in jobs:
        store.create(job, "caption")
    barrier = threading.Barrier(len(jobs))

    def run(job: str) -> tuple[JobState | None, bool]:
        barrier.wait()
        claim = store.claim(job, "w", 3, token=f"tok-{job}", lease_s=30)
        barrier.wait()
        return claim.state, store.transition(job, JobState.SUCCEEDED, result_uri=f"s3://b/{job}.json")

    with ThreadPoolExecutor(len(jobs)) as pool:
        outcomes = list(pool.map(run, jobs))
    assert outcomes == [(JobState.STARTED, True)] * len(jobs)
    assert all(store.get(j).result_uri == f"s3://b/{j}.json" for j in jobs)
    # Each claim and each end got its own answer; together they took fewer script calls than jobs.
    assert store._claims.items == len(jobs) and store._moves.items == len(jobs)
    assert store._claims.flushes + store._moves.flushes < 2 * len(jobs)


def test_an_event_feed_yields_each_status_of_a_batch_message(store: StatusStore) -> None:
    feed = store.events()
    try:
        at = "2026-12-06T00:00:00+00:00"
        records = [{"job_id": j, "state": "succeeded", "task": "caption", "attempts": "1", "created_at": at,
                    "updated_at": at} for j in ("f1", "f2")]  # fmt: skip
        store.redis.publish(EVENTS_CHANNEL, json.dumps(records))
        seen = [s.job_id for _ in range(5) if (s := feed.next(1.0)) is not None]  # the subscribe confirmation: None
        assert seen == ["f1", "f2"]
    finally:
        feed.close()


def test_a_stalled_holder_renews_nothing_on_a_job_another_delivery_has_ended(store: StatusStore) -> None:
    """A worker stalled past its lease; another delivery failed the job as poison (which leaves the old lease's
    fields in the record). The stalled worker's next heartbeat must not renew a lease on the finished job."""
    store.create("st", "caption")
    store.claim("st", "gpu0@a", 1, token="stalled", lease_s=0.05)
    time.sleep(0.1)
    assert store.claim("st", "gpu0@b", 1, token="next", lease_s=30).state is JobState.FAILED
    assert store.renew_leases({"st": "stalled"}, 60) == 0
    assert store.get("st").state is JobState.FAILED
