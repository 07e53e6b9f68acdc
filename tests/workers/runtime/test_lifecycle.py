"""The job lifecycle with fakes (cog's runner tests' shape): a real StatusStore on a real redis-server,
and fake engine, fetcher, result store, cache, leases, webhook sender and `retry`. No Celery, no worker."""

from __future__ import annotations

import ast
import logging
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from varco.tasks.delta_stream import Delta, DeltaStream, StreamEnd
from varco.tasks.errors import ImageFetchError
from varco.tasks.messages import InferMessage
from varco.tasks.schemas import ErrorInfo, ImageInfo, JobResult, JobState, ParsedOutput, Usage
from varco.tasks.settings import Settings
from varco.tasks.status import StatusStore
from varco.tasks.tags import parse
from varco.workers import logs
from varco.workers.devtools.local_redis import start_redis
from varco.workers.engines.base import Cancelled, GenerationOutput, GenerationRequest
from varco.workers.input.fetch import FetchedImage
from varco.workers.output import result_writer
from varco.workers.runtime import lifecycle
from varco.workers.runtime.cancels import CancelWatcher
from varco.workers.runtime.lifecycle import RetryNotQueued, Runtime, deliver

JOB = "job-1"
SHA = "ab" * 32
ENQUEUED = 1_700_000_000.0  # the fake clock starts 10.123456 s after the job was enqueued
ENQUEUED_AT = datetime.fromtimestamp(ENQUEUED, UTC).isoformat()
HOOK = "https://hooks.example/h"
TEXT = "A <obj>cat</obj><bbox>0.1, 0.2, 0.5, 0.6</bbox> on a mat."


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    with start_redis(tmp_path_factory.mktemp("redis-lifecycle")) as server:
        yield redis.Redis.from_url(server.url, decode_responses=True)


@pytest.fixture
def statuses(client: redis.Redis) -> StatusStore:
    client.flushdb()
    return StatusStore(client, ttl=600)


class Clock:
    """`time.time()` and `time.perf_counter()` of the lifecycle: moved only by the fakes, so timings are exact."""

    def __init__(self) -> None:
        self.now = ENQUEUED + 10.123456

    def time(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now


class Metrics:
    """Stands in for `varco.workers.metrics`: records what the lifecycle observes."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, str, dict[str, float] | None]] = []
        self.tokens: dict[str, int] = {}
        self.TOKENS = self

    def observe_job(self, task: str, state: str, phases: dict[str, float] | None = None) -> None:
        self.jobs.append((task, state, phases))

    def labels(self, kind: str) -> Any:
        metrics = self

        class Counter:
            def inc(self, n: int) -> None:
                metrics.tokens[kind] = metrics.tokens.get(kind, 0) + n

        return Counter()


@dataclass
class Fetcher:
    clock: Clock
    errors: list[Exception] = field(default_factory=list)  # raised by the next fetches, in order
    uris: list[str] = field(default_factory=list)
    contexts: list[dict[str, str]] = field(default_factory=list)  # the log fields while fetching

    def fetch(self, uri: str) -> FetchedImage:
        self.uris.append(uri)
        self.contexts.append(logs._job.get())
        self.clock.now += 1.23456
        if self.errors:
            raise self.errors.pop(0)
        return FetchedImage(image=Image.new("RGB", (40, 30)), sha256=SHA, size_bytes=5, data=b"bytes")


@dataclass
class Engine:
    clock: Clock
    text: str = TEXT
    finish_reason: str = "stop"
    error: BaseException | None = None
    requests: list[GenerationRequest] = field(default_factory=list)
    submitted: list[Any] = field(default_factory=list)
    cancel_checks: list[bool] = field(default_factory=list)
    streamed: list[bool] = field(default_factory=list)

    def prepare(self, generation: GenerationRequest) -> Any:
        self.requests.append(generation)
        return ("prepared", generation)

    def submit(self, prepared: Any, is_cancelled: Any, **streamed: Any) -> Future:
        self.submitted.append(prepared)
        self.streamed.append("on_delta" in streamed)
        if on_delta := streamed.get("on_delta"):  # the text in three pieces, as an engine thread would
            threading.Thread(target=lambda: [on_delta(p) for p in (self.text[:5], self.text[5:9], self.text[9:])]).run()
        self.clock.now += 2.34567
        self.cancel_checks.append(is_cancelled())
        future: Future = Future()
        if self.cancel_checks[-1]:
            future.set_exception(Cancelled())
        elif self.error is not None:
            future.set_exception(self.error)
        else:
            future.set_result(GenerationOutput(self.text, 11, 7, self.finish_reason))  # type: ignore[arg-type]
        return future


@dataclass
class Store:
    clock: Clock
    failures: int = 0  # the next writes that fail
    during_write: Any = None  # called inside each write, before it lands or fails
    delete_fails: bool = False
    objects: dict[str, bytes] = field(default_factory=dict)
    writes: int = 0

    def write(self, job_id: str, data: bytes) -> str:
        self.writes += 1
        self.clock.now += 0.5
        if self.during_write is not None:
            self.during_write()
        if self.failures:
            self.failures -= 1
            raise OSError("store is down")
        self.objects[f"{job_id}.json"] = data
        return f"mem://{job_id}.json"

    def write_image(self, job_id: str, data: bytes) -> str:
        self.objects[f"{job_id}.image"] = data
        return f"mem://{job_id}.image"

    def delete(self, job_id: str) -> None:
        if self.delete_fails:
            raise OSError("cannot delete")
        self.objects.pop(f"{job_id}.json", None)

    def result(self, job_id: str = JOB) -> JobResult:
        return JobResult.model_validate_json(self.objects[f"{job_id}.json"])


@dataclass
class Cache:
    hit: JobResult | None = None
    looked_up: list[tuple[str, str]] = field(default_factory=list)
    remembered: list[tuple[str, str, str, str]] = field(default_factory=list)

    def lookup(self, request: Any, sha256: str) -> JobResult | None:
        self.looked_up.append((request.image_uri, sha256))
        return self.hit

    def remember(self, request: Any, sha256: str, job_id: str, uri: str) -> None:
        self.remembered.append((request.task.value, sha256, job_id, uri))


@dataclass
class Leases:
    """Gives a held lease back in the record on release, as `LeaseKeeper` does; renews nothing."""

    statuses: StatusStore
    lease_s: float = 30.0
    held: list[tuple[str, str, str | None]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    def hold(self, job_id: str, token: str, delivery_tag: str | None) -> None:
        self.held.append((job_id, token, delivery_tag))

    def release(self, job_id: str) -> None:
        self.released.append(job_id)
        for held_job, token, _ in self.held:
            if held_job == job_id:
                self.statuses.release_lease(job_id, token)


class Requeued(Exception):
    """What Celery's `Retry` is to the lifecycle: raised out of `retry`, it ends the delivery."""


@dataclass
class Retries:
    outcome: type[Exception] | None = None  # raised by `retry` (None: it returns)
    countdowns: list[float] = field(default_factory=list)

    def __call__(self, countdown: float) -> None:
        self.countdowns.append(countdown)
        if self.outcome is not None:
            raise self.outcome("no broker")


@dataclass
class World:
    rt: Runtime
    statuses: StatusStore
    clock: Clock
    fetcher: Fetcher
    engine: Engine
    store: Store
    cache: Cache
    leases: Leases
    cancels: CancelWatcher
    metrics: Metrics
    webhooks: list[tuple[str, dict[str, Any]]]
    retry: Retries
    caplog: pytest.LogCaptureFixture

    def deliver(self, request: dict[str, Any] | None = None, *, enqueued_at: Any = ENQUEUED_AT, **more: Any) -> None:
        body = {"image_uri": "https://img.example/cat.png", "task": "caption"} | more if request is None else request
        deliver(self.rt, JOB, InferMessage(JOB, body, enqueued_at), self.retry, delivery_tag="tag-7")

    def status(self) -> Any:
        return self.statuses.get(JOB)

    def events(self) -> list[str]:
        return [payload["type"] for _, payload in self.webhooks]

    def logged(self) -> list[str]:
        """The lifecycle's log lines, formatted (a line whose arguments do not fit its format fails here)."""
        return [r.getMessage() for r in self.caplog.records if r.name == lifecycle.log.name]


@pytest.fixture
def world(statuses: StatusStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> World:
    caplog.set_level(logging.INFO, logger=lifecycle.log.name)
    clock, metrics = Clock(), Metrics()
    monkeypatch.setattr(lifecycle, "time", clock)
    monkeypatch.setattr(lifecycle, "metrics", metrics)
    monkeypatch.setattr(result_writer, "FIRST_WAIT_S", 0.01)  # the store's retries, without the real pauses
    monkeypatch.setattr(result_writer, "MAX_WAIT_S", 0.01)
    settings = Settings(model="test/model", max_attempts=3, store_retry_s=3.0, max_new_tokens=99, keep_images=True)
    fetcher, engine, store, cache, leases = Fetcher(clock), Engine(clock), Store(clock), Cache(), Leases(statuses)
    cancels = CancelWatcher(statuses.redis)  # its listener is not started: tests mark cancels by hand
    webhooks: list[tuple[str, dict[str, Any]]] = []
    rt = Runtime(
        settings=settings, hostname="gpu0@test", engine=engine, fetcher=fetcher, store=store,  # type: ignore[arg-type]
        statuses=statuses, cancels=cancels, leases=leases, cache=cache,  # type: ignore[arg-type]
        send_webhook=lambda url, payload: webhooks.append((url, payload)),
    )  # fmt: skip
    statuses.create(JOB, "caption")
    return World(
        rt, statuses, clock, fetcher, engine, store, cache, leases, cancels, metrics, webhooks, Retries(), caplog
    )


def test_a_job_runs_to_a_stored_result_a_succeeded_record_and_its_webhooks(world: World) -> None:
    world.deliver(callback_url=HOOK, metadata={"k": "v"}, max_new_tokens=12)
    status = world.status()
    assert status.state is JobState.SUCCEEDED and status.attempts == 1 and status.error is None
    assert status.result_uri == "mem://job-1.json" and status.worker == "gpu0@test"
    result = world.store.result()
    assert result.job_id == JOB and result.task == "caption" and result.state is JobState.SUCCEEDED
    assert result.model == "test/model" and result.prompt == world.engine.requests[0].prompt
    assert result.output == parse(TEXT, (40, 30)) and result.output.objects[0].boxes_px is not None
    assert result.usage == Usage(prompt_tokens=11, output_tokens=7)
    assert result.image == ImageInfo(
        uri="https://img.example/cat.png", width=40, height=30, sha256=SHA, kept_uri="mem://job-1.image"
    )
    assert world.store.objects["job-1.image"] == b"bytes"
    # Timings from the fake clock: started 10.123456 s after enqueue, 1.23456 s fetching, 2.34567 s generating.
    t = result.timings
    assert (t.queued_s, t.fetch_s, t.inference_s) == (10.1235, 1.2346, 2.3457)
    assert t.total_s == 13.7037  # up to the result, before its write
    assert result.worker == "gpu0@test" and result.metadata == {"k": "v"} and result.cached_from is None
    assert result.created_at == datetime.fromisoformat(ENQUEUED_AT) and result.finished_at is not None
    assert result.region is None and result.label is None
    generation = world.engine.requests[0]
    assert generation.max_new_tokens == 12 and generation.image_id == SHA and generation.image.size == (40, 30)
    assert world.engine.submitted == [("prepared", generation)] and world.engine.cancel_checks == [False]
    assert world.cache.looked_up == [("https://img.example/cat.png", SHA)]
    # Webhooks: started, then succeeded with the result's URI; the terminal one is marked as queued.
    assert [url for url, _ in world.webhooks] == [HOOK, HOOK]
    assert world.events() == ["job.started", "job.succeeded"]
    started, succeeded = (payload for _, payload in world.webhooks)
    assert started["state"] == "started" and started["job_id"] == JOB and started["metadata"] == {"k": "v"}
    assert started["result_uri"] is None and datetime.fromisoformat(started["timestamp"])
    assert succeeded["state"] == "succeeded" and succeeded["result_uri"] == "mem://job-1.json"
    assert succeeded["task"] == "caption" and succeeded["error"] is None
    assert world.statuses.terminal_webhook_sent(JOB)
    # The lease was held under this delivery's tag and given back; the cancel watch too.
    [(held_job, token, tag)] = world.leases.held
    assert (held_job, tag) == (JOB, "tag-7") and re.fullmatch(r"gpu0@test/[0-9a-f]{12}", token)
    assert world.leases.released == [JOB] and not world.cancels._running
    assert world.cache.remembered == [("caption", SHA, JOB, "mem://job-1.json")]
    assert world.fetcher.uris == ["https://img.example/cat.png"]
    assert world.fetcher.contexts == [{"job_id": JOB, "task": "caption"}]
    phases = {"fetch": 1.23456, "store": 0.5, "inference": 2.34567, "queue": 10.1235, "total": 14.203686}
    [(task, state, observed)] = world.metrics.jobs
    assert (task, state) == ("caption", "succeeded") and observed == pytest.approx(phases)
    assert world.metrics.tokens == {"prompt": 11, "output": 7}
    assert world.logged() == []


def test_the_settings_budget_applies_and_a_cut_output_is_flagged(world: World) -> None:
    world.engine.finish_reason = "length"
    world.rt.settings.keep_images = False
    world.deliver(enqueued_at=None)
    result = world.store.result()
    assert world.engine.requests[0].max_new_tokens == 99
    assert result.output.warnings == ["output stopped at max_new_tokens=99; it may be cut"]
    assert result.image.kept_uri is None and "job-1.image" not in world.store.objects
    # No enqueue time: the job counts as enqueued when this delivery read it (the clock is faked: never negative).
    assert result.timings.queued_s == 0.0 and result.timings.total_s == 0.0
    # No webhook wanted: none to send later either, so no mark is written (issue 24: 4 Redis commands a job).
    assert world.webhooks == [] and not world.statuses.terminal_webhook_sent(JOB)


def test_only_the_events_asked_for_are_sent(world: World) -> None:
    world.deliver(callback_url=HOOK, callback_events=["job.succeeded"])
    assert world.events() == ["job.succeeded"]


def test_an_inline_image_is_named_by_its_header_only(world: World) -> None:
    world.deliver(image_uri="data:image/png;base64,iVBORw0KGgo=,more")
    assert world.store.result().image.uri == "data:image/png;base64,…"


def test_a_referring_result_keeps_its_region_and_label(world: World) -> None:
    world.deliver(task="referring", region=[0.1, 0.2, 0.3, 0.4], label="the cup")
    result = world.store.result()
    assert result.region == (0.1, 0.2, 0.3, 0.4) and result.label == "the cup"


def test_a_repeat_is_answered_from_the_cache_without_the_engine(world: World) -> None:
    source = JobResult(
        job_id="job-0", task="caption", state=JobState.SUCCEEDED, model="test/model", prompt="p",
        image=ImageInfo(uri="https://img.example/old.png", width=1, height=1, sha256=SHA),
        output=ParsedOutput(raw="cached", text="cached"), usage=Usage(prompt_tokens=5, output_tokens=3),
        worker="gpu9@elsewhere", metadata={"old": True},
    )  # fmt: skip
    world.cache.hit = source
    world.deliver(metadata={"new": 1})
    result = world.store.result()
    assert world.engine.requests == [] and world.cache.remembered == []
    assert result.cached_from == "job-0" and result.output.text == "cached" and result.usage == Usage()
    assert result.job_id == JOB and result.worker == "gpu0@test" and result.metadata == {"new": 1}
    assert result.image.uri == "https://img.example/cat.png" and result.image.width == 40
    assert result.timings.inference_s == 0.0 and result.timings.fetch_s == 1.2346
    assert world.status().state is JobState.SUCCEEDED
    [(_, state, phases)] = world.metrics.jobs
    assert state == "succeeded"  # a cached answer ran no inference: none observed
    assert phases == pytest.approx({"fetch": 1.23456, "store": 0.5, "queue": 10.1235, "total": 11.858016})
    assert world.metrics.tokens == {}


def test_an_invalid_request_fails_before_any_fetch(world: World) -> None:
    world.deliver({"image_uri": "https://img.example/cat.png", "task": "dance", "callback_url": HOOK})
    status = world.status()
    assert status.state is JobState.FAILED and status.error.type == "InvalidRequest"
    assert status.error.message.startswith("invalid job request: task: ")
    assert "unknown task 'dance'" in status.error.message
    assert world.fetcher.uris == [] and world.webhooks == [] and world.leases.released == [JOB]
    assert world.logged() == [f"job job-1 failed: invalid message: {status.error.message}"]


def test_a_message_that_is_no_mapping_is_invalid_and_has_no_task_field(world: World) -> None:
    world.deliver(["not", "a", "request"])
    assert world.status().error.type == "InvalidRequest" and world.fetcher.contexts == []


def test_a_transient_fetch_error_is_retried_with_backoff(world: World) -> None:
    world.fetcher.errors = [ImageFetchError("503 from the image host", transient=True)]
    world.deliver(callback_url=HOOK)
    status = world.status()
    assert status.state is JobState.RETRYING
    assert status.error == ErrorInfo(type="ImageFetchError", message="503 from the image host")
    [countdown] = world.retry.countdowns
    assert 0.5 <= countdown <= 1.0  # the first retry: backoff_s(0)
    assert world.events() == ["job.started"] and not world.statuses.terminal_webhook_sent(JOB)
    assert world.metrics.jobs == [("caption", "retrying", None)] and world.leases.released == [JOB]
    assert world.logged() == ["job job-1: 503 from the image host (attempt 1); retrying"]
    # The redelivery counts a second attempt; it sends no second job.started and succeeds.
    world.deliver(callback_url=HOOK)
    status = world.status()
    assert status.state is JobState.SUCCEEDED and status.attempts == 2 and status.error is None
    assert world.events() == ["job.started", "job.succeeded"]


def test_the_second_retry_waits_longer(world: World) -> None:
    world.fetcher.errors = [ImageFetchError("timeout", transient=True) for _ in range(2)]
    world.deliver()
    world.deliver()
    assert 1.0 <= world.retry.countdowns[1] <= 2.0  # backoff_s(1)


def test_a_transient_error_on_the_last_attempt_fails_the_job(world: World) -> None:
    world.fetcher.errors = [ImageFetchError("timeout", transient=True) for _ in range(3)]
    for _ in range(3):
        world.deliver(callback_url=HOOK)
    status = world.status()
    assert status.state is JobState.FAILED and status.attempts == 3 and status.error.type == "ImageFetchError"
    assert len(world.retry.countdowns) == 2
    assert world.events() == ["job.started", "job.failed"]
    failed = world.webhooks[-1][1]
    assert failed["state"] == "failed" and failed["error"] == {"type": "ImageFetchError", "message": "timeout"}
    assert world.metrics.jobs[-1] == ("caption", "failed", None)
    assert world.statuses.terminal_webhook_sent(JOB)
    assert world.logged()[-1] == "job job-1 failed: ImageFetchError: timeout"


def test_a_permanent_fetch_error_fails_at_once(world: World) -> None:
    world.fetcher.errors = [ImageFetchError("404 Not Found")]
    world.deliver(callback_url=HOOK)
    status = world.status()
    assert status.state is JobState.FAILED
    assert status.error == ErrorInfo(type="ImageFetchError", message="404 Not Found")
    assert world.retry.countdowns == [] and world.events() == ["job.started", "job.failed"]


def test_a_retry_that_cannot_be_queued_fails_the_job(world: World) -> None:
    world.retry.outcome = RetryNotQueued
    world.fetcher.errors = [ImageFetchError("timeout", transient=True)]
    world.deliver(callback_url=HOOK)
    assert world.status().state is JobState.FAILED and world.status().error.message == "timeout"
    assert world.events() == ["job.started", "job.failed"]
    assert world.logged() == [
        "job job-1: timeout (attempt 1); retrying",
        "job job-1: could not schedule its retry",
        "job job-1 failed: ImageFetchError: timeout",
    ]


def test_a_queued_retry_ends_the_delivery_as_it_leaves(world: World) -> None:
    """Celery's Retry is raised out of `retry`: it propagates, and the job stays retrying."""
    world.retry.outcome = Requeued
    world.fetcher.errors = [ImageFetchError("timeout", transient=True)]
    with pytest.raises(Requeued):
        world.deliver(callback_url=HOOK)
    assert world.status().state is JobState.RETRYING and world.events() == ["job.started"]
    assert world.leases.released == [JOB] and not world.cancels._running


def test_a_cancel_while_generating_ends_the_job_cancelled(world: World) -> None:
    world.cancels.watch(JOB)  # as the listener would, for the job this process runs
    world.cancels.mark(JOB)
    world.deliver(callback_url=HOOK)
    assert world.engine.cancel_checks == [True]
    assert world.status().state is JobState.CANCELLED and world.store.objects == {}
    assert world.metrics.jobs == [("caption", "cancelled", None)]
    assert world.events() == ["job.started", "job.cancelled"] and world.logged() == []
    assert world.statuses.terminal_webhook_sent(JOB)


def test_a_job_cancelled_before_it_started_never_runs(world: World) -> None:
    world.statuses.request_cancel(JOB)
    world.deliver(callback_url=HOOK)
    assert world.status().state is JobState.CANCELLED
    assert world.fetcher.uris == [] and world.events() == ["job.cancelled"] and world.leases.held == []
    assert world.logged()[0] == "job job-1 not run: it is cancelled (delivery 0)"
    world.deliver(callback_url=HOOK)  # a second copy of the message: the webhook is not sent twice
    assert world.events() == ["job.cancelled"]


def test_an_engine_failure_is_an_inference_error(world: World) -> None:
    world.engine.error = RuntimeError("CUDA error")
    world.deliver()
    error = ErrorInfo(type="InferenceError", message="generation failed: RuntimeError('CUDA error')")
    assert world.status().state is JobState.FAILED and world.status().error == error


def test_an_unexpected_error_fails_the_job_with_its_type(world: World) -> None:
    world.fetcher.errors = [KeyError("boom")]
    world.deliver(callback_url=HOOK)
    status = world.status()
    assert status.state is JobState.FAILED and status.error == ErrorInfo(type="KeyError", message="'boom'")
    assert world.events() == ["job.started", "job.failed"]
    assert world.logged() == ["job job-1 failed unexpectedly", "job job-1 failed: KeyError: 'boom'"]


def test_a_failure_after_the_job_ended_elsewhere_sends_nothing(world: World) -> None:
    def cancel_then_fail() -> None:
        world.statuses.transition(JOB, JobState.CANCELLED)
        raise OSError("store unreachable")

    world.rt.settings.store_retry_s = 0.0
    world.store.during_write = cancel_then_fail
    world.deliver(callback_url=HOOK)
    # The cancel that ended it reports itself once; the failure sends nothing.
    assert world.status().state is JobState.CANCELLED and world.events() == ["job.started", "job.cancelled"]
    assert world.metrics.jobs == [] and world.statuses.terminal_webhook_sent(JOB)


def test_a_store_outage_retries_only_the_write(world: World) -> None:
    seen: list[tuple[JobState, ErrorInfo | None]] = []
    world.store.during_write = lambda: seen.append((world.status().state, world.status().error))
    world.store.failures = 2
    world.deliver()
    # Shown retrying with the store's error meanwhile; one inference, one attempt, then succeeded.
    assert [state for state, _ in seen] == [JobState.STARTED, JobState.RETRYING, JobState.RETRYING]
    error = seen[1][1]
    assert error.type == "ResultStoreError" and "cannot write the result yet" in error.message
    assert len(world.engine.requests) == 1 and world.store.writes == 3
    status = world.status()
    assert status.state is JobState.SUCCEEDED and status.attempts == 1 and status.error is None


def test_a_store_outage_past_its_deadline_fails_the_job(world: World) -> None:
    world.rt.settings.store_retry_s = 0.0
    world.store.failures = 1
    world.deliver(callback_url=HOOK)
    status = world.status()
    assert status.state is JobState.FAILED and status.error.type == "ResultStoreError"
    assert "cannot write the result (retried for 0s)" in status.error.message
    assert world.retry.countdowns == [] and world.events() == ["job.started", "job.failed"]


def test_a_job_cancelled_while_its_result_waits_gets_nothing_written(world: World) -> None:
    world.store.failures = 2
    # A cancel while the job shows retrying (its first write failed) ends it at once.
    world.store.during_write = lambda: world.store.writes == 2 and world.statuses.request_cancel(JOB)
    world.deliver(callback_url=HOOK)
    assert world.store.writes == 2 and "job-1.json" not in world.store.objects
    assert world.status().state is JobState.CANCELLED and world.events() == ["job.started", "job.cancelled"]
    assert world.metrics.jobs == [] and world.cache.remembered == []
    assert world.logged() == ["job job-1 ended while its result waited; nothing written"]


def test_a_result_written_while_the_job_failed_is_removed(world: World) -> None:
    error = ErrorInfo(type="X", message="failed elsewhere")
    world.store.during_write = lambda: world.statuses.transition(JOB, JobState.FAILED, error=error)
    world.deliver(callback_url=HOOK)
    assert "job-1.json" not in world.store.objects and world.status().error == error
    assert world.events() == ["job.started"] and world.cache.remembered == [] and world.metrics.tokens == {}
    assert world.logged() == ["job job-1 ended failed while its result was written; removing it"]


def test_a_result_whose_record_vanished_meanwhile_is_removed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = iter([None, None])  # the write's check (`state`) found it; then it expired
    monkeypatch.setattr(world.statuses, "get", lambda job_id: next(reads))
    world.store.during_write = lambda: world.statuses.transition(
        JOB, JobState.FAILED, error=ErrorInfo(type="X", message="x")
    )
    world.deliver()
    assert "job-1.json" not in world.store.objects
    assert world.logged() == ["job job-1 ended unknown while its result was written; removing it"]


def test_a_result_another_run_stored_for_the_succeeded_job_stays(world: World) -> None:
    world.store.during_write = lambda: world.statuses.transition(JOB, JobState.SUCCEEDED, result_uri="mem://other")
    world.deliver(callback_url=HOOK)
    assert "job-1.json" in world.store.objects and world.status().result_uri == "mem://other"
    assert world.events() == ["job.started"] and world.logged() == []


def test_a_result_that_cannot_be_removed_is_logged(world: World) -> None:
    world.store.delete_fails = True
    world.store.during_write = lambda: world.statuses.transition(JOB, JobState.CANCELLED)
    world.deliver()
    assert world.status().state is JobState.CANCELLED and "job-1.json" in world.store.objects
    assert world.logged() == [
        "job job-1 ended cancelled while its result was written; removing it",
        "job job-1: could not remove its result",
    ]


def test_a_record_lost_meanwhile_is_made_anew_by_the_end(world: World) -> None:
    world.store.during_write = lambda: world.statuses.delete(JOB)
    world.deliver(callback_url=HOOK)
    status = world.status()
    assert status.state is JobState.SUCCEEDED and status.task == "caption" and status.result_uri == "mem://job-1.json"
    assert world.events() == ["job.started", "job.succeeded"]


def test_a_delivery_of_a_finished_job_runs_nothing_again(world: World) -> None:
    world.deliver(callback_url=HOOK)
    world.deliver(callback_url=HOOK)  # a duplicate (a redelivery after the ack was lost)
    assert len(world.engine.requests) == 1 and world.store.writes == 1
    assert world.events() == ["job.started", "job.succeeded"]  # its terminal webhook was already queued
    assert world.status().attempts == 1 and len(world.leases.held) == 1
    assert world.logged() == ["job job-1 not run: it is succeeded (delivery 1)"]


@pytest.mark.parametrize(
    ("state", "fields", "event"),
    [
        (JobState.SUCCEEDED, {"result_uri": "mem://job-1.json"}, "job.succeeded"),
        (JobState.FAILED, {"error": ErrorInfo(type="ImageFetchError", message="404")}, "job.failed"),
    ],
)
def test_a_terminal_webhook_no_run_queued_is_sent_by_the_next_delivery(
    world: World, state: JobState, fields: dict[str, Any], event: str
) -> None:
    world.statuses.transition(JOB, state, **fields)  # the run that ended it died before its webhook
    world.deliver(callback_url=HOOK, metadata={"m": 1})
    assert world.fetcher.uris == []
    [(url, payload)] = world.webhooks
    assert url == HOOK and payload["type"] == event and payload["state"] == state.value
    assert payload["result_uri"] == fields.get("result_uri") and payload["metadata"] == {"m": 1}
    error = fields.get("error")
    assert payload["error"] == (error.model_dump() if error else None)
    assert world.statuses.terminal_webhook_sent(JOB)
    assert world.logged() == [
        f"job job-1 not run: it is {state.value} (delivery 0)",
        f"job job-1: sending its {event} webhook, which no run had queued",
    ]
    world.deliver(callback_url=HOOK, metadata={"m": 1})
    assert len(world.webhooks) == 1  # once


def test_a_poison_message_sends_its_failed_webhook(world: World) -> None:
    for _ in range(3):
        world.statuses.begin_attempt(JOB, "dead@worker", 3)  # three runs that died
    world.deliver(callback_url=HOOK)
    assert world.status().error.type == "PoisonMessageError" and world.events() == ["job.failed"]


def test_a_queued_cancel_gets_its_webhook_and_an_unreadable_request_none(world: World) -> None:
    world.statuses.transition(JOB, JobState.FAILED, error=ErrorInfo(type="X", message="x"))
    world.deliver({"image_uri": "ftp://nope", "task": "caption", "callback_url": HOOK})
    assert world.webhooks == [] and not world.statuses.terminal_webhook_sent(JOB)
    world.statuses.create("job-2", "caption")
    world.statuses.request_cancel("job-2")
    request = {"image_uri": "https://i/x", "task": "caption", "callback_url": HOOK}
    deliver(world.rt, "job-2", InferMessage("job-2", request), world.retry, delivery_tag=None)
    assert world.events() == ["job.cancelled"] and world.statuses.terminal_webhook_sent("job-2")


def test_a_copy_of_a_job_a_live_run_holds_waits_for_its_lease(world: World) -> None:
    claim = world.statuses.claim(JOB, "gpu1@other", 3, "gpu1@other/abc", lease_s=30.0)
    assert claim.state is JobState.STARTED
    world.deliver(callback_url=HOOK)
    [countdown] = world.retry.countdowns
    assert 30.0 < countdown <= 31.0  # when the lease would lapse, plus a second
    assert world.fetcher.uris == [] and world.webhooks == [] and world.leases.held == []
    assert world.status().attempts == 1 and world.leases.released == [JOB]
    [line] = world.logged()
    assert re.fullmatch(r"job job-1 is running under a live lease; this delivery waits (29\.\d|30\.0)s", line)


def test_the_lifecycle_imports_no_celery() -> None:
    """The transport stays in `celery_task.py`: the lifecycle runs on whatever calls `deliver`."""
    tree = ast.parse(Path(lifecycle.__file__).read_text(encoding="utf-8"))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [name for name in imported if name.split(".")[0] in ("celery", "kombu")]


def test_a_streamed_job_publishes_its_text_and_ends_its_stream_and_other_jobs_publish_nothing(world: World) -> None:
    world.rt.deltas = DeltaStream(world.statuses.redis, 600)
    world.deliver()
    assert world.engine.streamed == [False] and not world.rt.deltas.is_open(JOB)  # no hook, no stream key
    world.statuses.delete(JOB)
    world.statuses.create(JOB, "caption")
    world.deliver(stream=True)
    assert world.engine.streamed == [False, True] and world.status().state is JobState.SUCCEEDED
    entries = world.rt.deltas.read(JOB)
    assert "".join(e.text for e in entries if isinstance(e, Delta)) == TEXT  # pieces that piled up go as one
    assert entries[-1] == StreamEnd(entries[-1].id, "succeeded", "stop", prompt_tokens=11, output_tokens=7)


def test_a_failed_streamed_job_ends_its_stream_failed(world: World) -> None:
    world.rt.deltas = DeltaStream(world.statuses.redis, 600)
    world.engine.error = RuntimeError("boom")
    world.deliver(stream=True)
    end = world.rt.deltas.read(JOB)[-1]
    assert isinstance(end, StreamEnd) and end.state == "failed" and end.finish_reason is None


def test_a_streamed_repeat_answered_from_the_cache_publishes_the_whole_answer_at_once(world: World) -> None:
    world.rt.deltas = DeltaStream(world.statuses.redis, 600)
    world.cache.hit = JobResult(
        job_id="job-0", task="caption", state=JobState.SUCCEEDED, model="test/model", prompt="p",
        image=ImageInfo(uri="https://img.example/old.png", width=1, height=1, sha256=SHA),
        output=ParsedOutput(raw="<obj>cached</obj>", text="cached"),
    )  # fmt: skip
    world.deliver(stream=True)
    text, end = world.rt.deltas.read(JOB)
    assert world.engine.requests == [] and text.text == "<obj>cached</obj>"  # type: ignore[union-attr]
    assert isinstance(end, StreamEnd) and end.state == "succeeded"


@pytest.mark.parametrize(
    ("task", "constrained", "default", "shape"),
    [
        ("grounding", None, "on", "grounded_text"),
        ("ocr", None, "on", "ocr"),
        ("caption", None, "on", None),
        ("caption", True, "on", "grounded_text"),
        ("ocr", False, "on", None),
        ("vqa", None, "all", "grounded_text"),
        ("grounding", None, "off", None),
        ("ocr", True, "off", "ocr"),
    ],
)
def test_the_engine_gets_the_constraint_of_the_job_flag_or_the_setting(
    world: World, task: str, constrained: bool | None, default: str, shape: str | None
) -> None:
    world.rt.settings.constrained_tags = default
    world.deliver(task=task, **({"prompt": "what?"} if task == "vqa" else {}), constrained=constrained)
    assert world.engine.requests[0].constraint == shape


# --- its spans (issue 23; docs/tracing.md) -------------------------------------------------------------
def named(spans: Any, name: str) -> Any:
    [span] = [s for s in spans.get_finished_spans() if s.name == name]
    return span


def test_a_job_is_a_consumer_span_with_semantic_convention_attributes(world: World, spans: Any) -> None:
    world.deliver(callback_url=HOOK)
    job = named(spans, "varco.job")
    assert job.kind.name == "CONSUMER"
    assert dict(job.attributes) == {
        "varco.job_id": JOB,
        "varco.task": "caption",
        "varco.tenant": "default",
        "varco.worker": "gpu0@test",
        "messaging.system": "celery",
        "messaging.operation.type": "process",
    }  # the fake engine has no name: no varco.engine
    assert [(e.name, dict(e.attributes)) for e in job.events] == [
        ("varco.status", {"varco.state": "started", "varco.attempt": 1}),
        ("varco.status", {"varco.state": "succeeded", "varco.transitioned": True}),
    ]
    children = [s for s in spans.get_finished_spans() if s.parent and s.parent.span_id == job.context.span_id]
    assert sorted(s.name for s in children) == ["varco.fetch", "varco.parse", "varco.prepare", "varco.queue_wait",
                                                "varco.result_write"]  # fmt: skip
    assert named(spans, "varco.fetch").attributes["url.full"] == "https://img.example/cat.png"


@pytest.mark.parametrize(
    ("uri", "secret", "shown"),
    [
        ("https://img.example/cat.png?X-Amz-Signature=s3cr3t&token=t0k", "s3cr3t", "https://img.example/cat.png?[redacted]"),
        ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==", "iVBORw0KGgo", "data:image/png;base64,…"),
    ],
)  # fmt: skip
def test_image_urls_in_spans_are_redacted_as_in_the_logs(world: World, spans: Any, uri: str, secret: str,
                                                         shown: str) -> None:  # fmt: skip
    # The first attempt's fetch fails with the URL in its message (as the fetcher's errors say it); the
    # second succeeds. Neither the span's attributes nor the recorded error hold the secret.
    world.fetcher.errors = [ImageFetchError(f"HTTP 503 fetching {uri}", transient=True)]
    world.deliver(image_uri=uri)
    world.deliver(image_uri=uri)
    assert world.status().state is JobState.SUCCEEDED
    recorded = [(s.name, dict(s.attributes), s.status.description, [(e.name, dict(e.attributes)) for e in s.events])
                for s in spans.get_finished_spans()]  # fmt: skip
    assert secret not in repr(recorded) and "t0k" not in repr(recorded)  # never a query string nor a payload
    failed, fetched = [s for s in spans.get_finished_spans() if s.name == "varco.fetch"]
    assert failed.status.status_code.name == "ERROR" and failed.attributes["error.type"] == "ImageFetchError"
    assert [e.attributes["exception.message"] for e in failed.events] == [f"HTTP 503 fetching {shown}"]
    assert failed.attributes["url.full"] == fetched.attributes["url.full"] == shown


def test_a_cache_hit_is_a_span_naming_its_source_job(world: World, spans: Any) -> None:
    world.cache.hit = JobResult(
        job_id="job-0", task="caption", state=JobState.SUCCEEDED, model="test/model", prompt="p",
        image=ImageInfo(uri="https://img.example/old.png", width=1, height=1, sha256=SHA),
        output=ParsedOutput(raw="cached", text="cached"), usage=Usage(), worker="gpu9@elsewhere",
    )  # fmt: skip
    world.deliver()
    hit, job = named(spans, "varco.result_cache.hit"), named(spans, "varco.job")
    assert hit.attributes["varco.cached_from"] == "job-0" and hit.parent.span_id == job.context.span_id
    names = {s.name for s in spans.get_finished_spans()}
    assert "varco.prepare" not in names and "varco.parse" not in names  # no engine ran
    assert named(spans, "varco.result_write").parent.span_id == hit.context.span_id


def test_a_cancel_is_an_event_on_the_job_span(world: World, spans: Any) -> None:
    world.cancels.watch(JOB)
    world.cancels.mark(JOB)
    world.deliver()
    job = named(spans, "varco.job")
    assert [(e.name, e.attributes.get("varco.state")) for e in job.events] == [
        ("varco.status", "started"), ("varco.cancel", None), ("varco.status", "cancelled")]  # fmt: skip
    assert job.status.status_code.name == "UNSET"  # a cancel is no error


def test_the_stores_retries_are_events_on_the_result_write_span(world: World, spans: Any) -> None:
    world.store.failures = 2
    world.deliver()
    write = named(spans, "varco.result_write")
    retries = [e for e in write.events if e.name == "varco.store_retry"]
    assert len(retries) == 2 and all("varco.retry_in_s" in e.attributes for e in retries)
    assert world.status().state is JobState.SUCCEEDED


def test_a_failed_job_is_an_error_span_with_its_error_type(world: World, spans: Any) -> None:
    world.engine.error = RuntimeError("CUDA error")
    world.deliver()
    job = named(spans, "varco.job")
    assert job.status.status_code.name == "ERROR" and job.attributes["error.type"] == "InferenceError"
    assert job.status.description.startswith("InferenceError: generation failed")
