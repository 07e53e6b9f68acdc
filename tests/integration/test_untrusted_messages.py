"""Messages sent straight to the broker, skipping Client's checks, against a real `varco worker`.

Each must end `failed` with InvalidRequest before anything is fetched or run, or be dropped when it has
no usable job id; nothing may be written outside the result prefix. Also: the s3:// bucket allow-list.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import time
import uuid

import pytest
from conftest import CAT, IMAGES_BUCKET, RESULTS_BUCKET
from PIL import Image

from varco.producer import Client
from varco.tasks.celery_app import INFER_TASK
from varco.tasks.status import now_iso

CAPTION = {"task": "caption"}


def send_raw(client: Client, args: list, kwargs: dict | None = None, task_id: str | None = None) -> None:
    client.app.send_task(INFER_TASK, args=args, kwargs=kwargs or {}, task_id=task_id or uuid.uuid4().hex)


def queued_job(client: Client) -> str:
    """A record as Client.submit leaves it, for a message we then send by hand."""
    job_id = uuid.uuid4().hex
    client.statuses.create(job_id, "caption")
    return job_id


def result_keys(s3) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=RESULTS_BUCKET).get("Contents", [])]


def assert_failed_invalid(client: Client, job_id: str, match: str) -> None:
    status = next(client.wait(job_id, timeout=60))
    assert status.state.value == "failed", status
    assert status.error is not None and status.error.type == "InvalidRequest", status.error
    assert match in status.error.message, status.error.message


def test_a_job_id_that_climbs_out_is_dropped_and_writes_nothing(client: Client, http_files, s3) -> None:
    before = set(result_keys(s3))
    bad_ids = ["./../escaped", "../../escaped", "jobs/../../escaped", "a:b"]
    for bad in bad_ids:
        send_raw(client, [bad, {"image_uri": http_files.base + "/cat.png", **CAPTION}], {"enqueued_at": now_iso()})
    # A good job sent after them: once it is done, the worker has taken the bad ones off the queue.
    marker = client.submit(http_files.base + "/cat.png", "caption")
    assert next(client.wait(marker, timeout=60)).state.value == "succeeded"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # nothing may show up late either
        new = set(result_keys(s3)) - before
        assert new <= {f"jobs/{marker}.json"}, new
        assert not [k for k in client.redis.scan_iter("varco:job:*") if "escaped" in k or k.endswith("a:b")]
        time.sleep(0.5)


def test_an_oversized_data_uri_fails_as_invalid_request(client: Client, settings) -> None:
    pixels = Image.frombytes("RGB", (1300, 1300), os.urandom(1300 * 1300 * 3))
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG")  # about 5 MB of a real, decodable image
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert len(buffer.getvalue()) > settings.max_data_uri_bytes
    job_id = queued_job(client)
    send_raw(client, [job_id, {"image_uri": uri, **CAPTION}], {"enqueued_at": now_iso()}, task_id=job_id)
    assert_failed_invalid(client, job_id, "VARCO_MAX_DATA_URI_BYTES")


@pytest.mark.parametrize(("depth", "reason"), [(200, "nested"), (5000, "cannot be decoded")])
def test_deeply_nested_metadata_fails_as_invalid_request(client: Client, http_files, depth: int, reason: str) -> None:
    """200 levels decode and are refused by the depth limit; 5,000 are past the JSON parser's own depth."""
    route = f"/deep-{depth}.png"
    http_files.add(route, CAT)
    metadata: dict = {}
    for _ in range(depth):
        metadata = {"a": metadata}
    job_id = queued_job(client)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * depth))  # so this producer can encode it at all
    try:
        request = {"image_uri": http_files.base + route, **CAPTION, "metadata": metadata}
        send_raw(client, [job_id, request], {"enqueued_at": now_iso()}, task_id=job_id)
    finally:
        sys.setrecursionlimit(limit)
    assert_failed_invalid(client, job_id, reason)
    assert http_files.routes[route].hits == 0  # refused before any fetch


def test_a_non_string_enqueued_at_fails_before_the_fetch(client: Client, http_files) -> None:
    http_files.add("/enqueued.png", CAT)
    job_id = queued_job(client)
    send_raw(client, [job_id, {"image_uri": http_files.base + "/enqueued.png", **CAPTION}], {"enqueued_at": 123},
             task_id=job_id)  # fmt: skip
    assert_failed_invalid(client, job_id, "enqueued_at")
    assert http_files.routes["/enqueued.png"].hits == 0


def test_wrong_arguments_fail_as_invalid_request(client: Client) -> None:
    job_id = queued_job(client)
    send_raw(client, [job_id], task_id=job_id)
    assert_failed_invalid(client, job_id, "no request")


def test_s3_images_only_from_allowed_buckets(client: Client, s3) -> None:
    s3.put_object(Bucket=RESULTS_BUCKET, Key="private/cat.png", Body=CAT)  # readable by the worker's credentials
    refused = client.submit(f"s3://{RESULTS_BUCKET}/private/cat.png", "caption")
    allowed = client.submit(f"s3://{IMAGES_BUCKET}/in/cat.png", "caption")
    finished = {s.job_id: s for s in client.wait([refused, allowed], timeout=60)}
    assert finished[allowed].state.value == "succeeded"
    assert finished[refused].state.value == "failed"
    assert finished[refused].error.type == "ForbiddenURLError"
    assert "VARCO_S3_BUCKETS" in finished[refused].error.message
