"""Idempotency keys name one request: the same request returns its first job, another one is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from varco.producer import Client, IdempotencyKeyReused, InvalidRequest
from varco.tasks.celery_app import INFER_QUEUE, queue_depth
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import start_redis

URL = "https://cdn.example.com/cat.jpg"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    with start_redis(tmp_path) as server, Client(Settings(broker_url=server.url, _env_file=None)) as c:
        yield c


def test_a_key_reused_for_another_request_raises_invalid_request(client: Client) -> None:
    first = client.submit(URL, "ocr", idempotency_key="scan-1")
    assert client.submit(URL, "ocr", idempotency_key="scan-1") == first
    with pytest.raises(InvalidRequest, match=f"first used with a different request \\(job {first}\\)") as info:
        client.submit(URL, "grounding", idempotency_key="scan-1")
    assert isinstance(info.value, IdempotencyKeyReused) and info.value.field == "idempotency_key"
    assert queue_depth(client.redis, INFER_QUEUE) == 1


def test_submit_many_refuses_a_reused_key_before_enqueueing_any(client: Client) -> None:
    client.submit(URL, "caption", prompt="Short.", idempotency_key="k")
    with pytest.raises(IdempotencyKeyReused, match=r"^request #1: ") as info:
        client.submit_many(
            [{"image_uri": URL, "task": "caption"}, {"image_uri": URL, "task": "caption", "idempotency_key": "k"}]
        )
    assert info.value.index == 1
    assert queue_depth(client.redis, INFER_QUEUE) == 1  # only the first submit's job
