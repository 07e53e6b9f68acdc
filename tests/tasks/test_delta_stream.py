"""The delta stream's owner (tasks/delta_stream.py) and the worker's publisher, on a real Redis."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
import redis

from varco.tasks import delta_stream, keys
from varco.tasks.delta_stream import Delta, DeltaStream, StreamEnd
from varco.workers.runtime.delta_publisher import DeltaPublisher

JOB = "job-7"


@pytest.fixture
def stream(flushed_redis: redis.Redis) -> DeltaStream:
    return DeltaStream(flushed_redis, 600)


def test_entries_read_in_order_from_any_id_with_the_end_last(stream: DeltaStream) -> None:
    assert not stream.is_open(JOB) and stream.read(JOB) == []
    stream.open(JOB)
    assert stream.is_open(JOB) and stream.read(JOB) == []  # `open` says the job streams; it carries no text
    stream.append(JOB, "<obj>")
    stream.append(JOB, "cat")
    stream.end(JOB, "succeeded", finish_reason="length", prompt_tokens=90, output_tokens=2)
    first, second, end = stream.read(JOB)
    assert (first.text, second.text) == ("<obj>", "cat") and isinstance(first, Delta)
    assert end == StreamEnd(end.id, "succeeded", "length", 90, 2)
    assert stream.read(JOB, first.id) == [second, end]  # a reader resumes after the last id it saw
    assert stream.text(JOB) == "<obj>cat"


def test_every_write_caps_the_stream_and_renews_its_expiry(stream: DeltaStream, monkeypatch) -> None:
    monkeypatch.setattr(delta_stream, "MAX_ENTRIES", 5)
    stream.redis.expire(keys.deltas(JOB), 1)
    for i in range(500):
        stream.append(JOB, str(i))
    assert 0 < stream.redis.xlen(keys.deltas(JOB)) < 500  # approximate trimming: whole nodes at a time
    assert 590 < stream.redis.ttl(keys.deltas(JOB)) <= 600


def test_a_reader_blocks_until_text_comes(stream: DeltaStream) -> None:
    threading.Timer(0.2, stream.append, (JOB, "late")).start()
    [entry] = stream.read(JOB, block_ms=30_000)
    assert entry.text == "late"  # type: ignore[union-attr]


def test_the_publisher_sends_what_a_retry_adds_and_survives_redis_failing(stream: DeltaStream) -> None:
    stream.append(JOB, "<obj>ca")  # an attempt that failed half-way
    publisher, done = DeltaPublisher(stream, JOB), Future()
    for piece in ("<obj>", "cat", "</obj>"):
        publisher.put(piece)
    done.set_result(None)
    publisher.pump(done)
    assert stream.text(JOB) == "<obj>cat</obj>"  # what the rerun adds, never the answer twice

    broken = DeltaPublisher(DeltaStream(redis.Redis(port=9, socket_connect_timeout=0.2), 60), JOB)
    broken.publish("x")
    broken.end("succeeded", None)  # both logged; the job goes on
    assert broken.broken
