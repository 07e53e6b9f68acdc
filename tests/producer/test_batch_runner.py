"""The batch runner against a real Redis, without workers: validation, expansion with its checkpoint, a
lease other runners respect, and the repair of a line whose job was never queued (its runner died between
binding the idempotency key and inserting the job)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("openai")
from varco.producer import Client
from varco.producer.batch_runner import BatchRunner
from varco.tasks.batches import BatchStatus, BatchStore
from varco.tasks.settings import Settings


def chat_line(custom_id: str) -> str:
    content = [{"type": "text", "text": "<ocr>"}, {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]
    body = {"model": "varco-vision", "messages": [{"role": "user", "content": content}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"


@pytest.fixture
def client(flushed_redis, module_redis, tmp_path: Path):
    settings = Settings(broker_url=module_redis.url, result_store=tmp_path.as_uri() + "/", batch_lease_s=1)
    with Client(settings) as c:
        yield c


def test_lines_are_expanded_once_under_one_lease(client: Client, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(chat_line(f"r{n}") for n in range(250)))
    batch_id = client.submit_batch(source)
    store = BatchStore(client.redis, 60)
    assert store.claim(batch_id, "another-runner", 30)
    BatchRunner(client).run_once()  # the batch is leased to another runner: nothing happens
    assert client.batch(batch_id).status is BatchStatus.VALIDATING
    store.release(batch_id, "another-runner")

    runner = BatchRunner(client)
    for _ in range(10):  # a turn lasts a lease (1 s here); a slow machine takes several for 250 lines
        runner.run_once()
    record = client.batch(batch_id)
    assert (record.status, record.total, record.expanded) == (BatchStatus.IN_PROGRESS, 250, 250)
    assert record.input_offset == source.stat().st_size
    jobs = store.job_ids(batch_id, 0, 250)
    assert len(set(jobs)) == 250 and client.fair.depth() == 250
    assert client.status(jobs[0]).tenant == "default"

    BatchRunner(client).run_once()  # again: nothing is submitted twice
    assert store.job_ids(batch_id, 0, 300) == jobs and client.fair.depth() == 250


def test_a_line_whose_job_was_never_queued_is_submitted_again_once(client: Client, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(chat_line(f"r{n}") for n in range(3)))
    batch_id = client.submit_batch(source)
    runner = BatchRunner(client)
    runner.run_once()
    store = BatchStore(client.redis, 60)
    first = store.job_ids(batch_id, 0, 3)
    assert client.fair.revoke(first[1])  # what a runner killed between the key and the insert leaves: queued, unheld
    time.sleep(1.2)  # older than a lease: no live submit is between its two steps
    runner.run_once()
    repaired = store.job_ids(batch_id, 0, 3)
    assert repaired[0] == first[0] and repaired[2] == first[2] and repaired[1] != first[1]
    assert client.fair.holds(repaired) == [True, True, True] and client.statuses.get(first[1]) is None
    runner.run_once()
    assert store.job_ids(batch_id, 0, 3) == repaired and client.fair.depth() == 3


def test_a_batch_past_its_window_ends_expired_with_every_line_in_the_error_file(client: Client, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(chat_line(f"r{n}") for n in range(4)))
    batch_id = client.submit_batch(source)
    runner = BatchRunner(client)
    runner.run_once()
    store = BatchStore(client.redis, 60)
    jobs = store.job_ids(batch_id, 0, 4)
    assert len(jobs) == 4 and client.fair.depth() == 4

    record = client.batch(batch_id)
    record.expires_at = int(time.time()) - 1  # the completion window has passed with no worker running
    assert store.claim(batch_id, "test", 30)
    store.save(record, "test")
    store.release(batch_id, "test")
    for _ in range(5):
        runner.run_once()
        if client.batch(batch_id).status.value in ("expired", "completed"):
            break

    record = client.batch(batch_id)
    assert record.status is BatchStatus.EXPIRED and record.expired_at is not None
    assert (record.total, record.completed, record.failed, record.output_file_id) == (4, 0, 4, None)
    assert [client.status(j).state.value for j in jobs] == ["cancelled"] * 4  # queued lines never start
    error_file = client.batches.file(record.error_file_id)
    lines = [json.loads(raw) for raw in b"".join(client.batches.content(error_file)).splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["r0", "r1", "r2", "r3"]
    assert {line["error"]["code"] for line in lines} == {"batch_expired"}
