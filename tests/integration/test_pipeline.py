"""The whole pipeline over real connections: Client -> Redis -> `varco worker` -> S3 results."""

from __future__ import annotations

import base64
import itertools
import json

import pytest
import standardwebhooks
from conftest import CAT, IMAGES_BUCKET, RESULTS_BUCKET, ROTATED, SECRET, SIGN, sha, submit_every_task
from helpers import card_output

from varco.producer import Client, InvalidRequest, JobFailed
from varco.producer.webhooks import WebhookVerificationError, verify
from varco.tasks.celery_app import queue_depth


def stored_result(s3, job_id: str) -> dict:
    body = s3.get_object(Bucket=RESULTS_BUCKET, Key=f"jobs/{job_id}.json")["Body"].read()
    return json.loads(body)


def test_every_task_type_succeeds_with_the_documented_result(client: Client, http_files, s3) -> None:
    url = http_files.base + "/cat.png"
    jobs = submit_every_task(client, url)
    finished = {s.job_id: s for s in client.wait(jobs.values(), timeout=120)}
    assert {s.state.value for s in finished.values()} == {"succeeded"}, finished

    for task, job_id in jobs.items():
        status = client.status(job_id)
        assert status.result_uri == f"s3://{RESULTS_BUCKET}/jobs/{job_id}.json"
        assert status.attempts == 1 and status.worker and status.worker.startswith("cpu0@")
        data = stored_result(s3, job_id)
        assert set(data) >= {"job_id", "task", "state", "model", "prompt", "image", "output", "usage", "timings",
                             "worker", "created_at", "finished_at", "metadata"}  # fmt: skip
        assert (data["job_id"], data["task"], data["state"]) == (job_id, task, "succeeded")
        kept = f"s3://{RESULTS_BUCKET}/jobs/{job_id}.image"  # the fetched bytes, kept for overlays
        assert data["image"] == {"uri": url, "width": 640, "height": 480, "sha256": sha(CAT), "kept_uri": kept}
        assert s3.get_object(Bucket=RESULTS_BUCKET, Key=f"jobs/{job_id}.image")["Body"].read() == CAT
        assert set(data["output"]) == {"raw", "text", "objects", "ocr", "warnings"}
        assert data["usage"]["prompt_tokens"] > 0 and data["usage"]["output_tokens"] > 0
        assert set(data["timings"]) == {"queued_s", "fetch_s", "inference_s", "total_s"}
        assert client.result(job_id).model_dump(mode="json")["job_id"] == job_id

    grounding = stored_result(s3, jobs["grounding"])
    assert grounding["prompt"] == "<gro>\nDescribe the image in detail."
    assert grounding["output"]["raw"] == card_output("grounding")
    assert grounding["output"]["objects"][0] == {
        "label": "two cats", "span": [16, 24],
        "boxes": [[0.014, 0.106, 0.51, 0.996], [0.51, 0.054, 0.996, 0.787]],
        "boxes_px": [[9, 51, 326, 478], [326, 26, 637, 378]],
    }  # fmt: skip
    ocr = stored_result(s3, jobs["ocr"])["output"]["ocr"]
    assert len(ocr) == 16 and ocr[0] == {"text": "백범로", "box": [0.172, 0.266, 0.328, 0.341],
                                         "box_px": [110, 128, 210, 164]}  # fmt: skip
    referring = stored_result(s3, jobs["referring"])
    assert referring["prompt"] == "<obj>이 물건</obj><bbox>0.039, 0.138, 0.283, 0.257</bbox>은 어떻게 쓰는거야?"
    assert (referring["region"], referring["label"]) == ([0.039, 0.138, 0.283, 0.257], "이 물건")  # for overlays
    assert referring["output"]["text"] == card_output("referring")
    assert stored_result(s3, jobs["caption"])["metadata"] == {"user": 7}


def test_every_image_source(client: Client, http_files, file_root) -> None:
    sources = {
        "http": (http_files.base + "/cat.png", CAT),
        "redirect": (http_files.base + "/redirect", CAT),
        "s3": (f"s3://{IMAGES_BUCKET}/in/sign.png", SIGN),
        "file": ((file_root / "sign.png").as_uri(), SIGN),
        "data": ("data:image/png;base64," + base64.b64encode(CAT).decode(), CAT),
    }
    jobs = {name: client.submit(uri, "ocr", max_new_tokens=1024) for name, (uri, _) in sources.items()}
    list(client.wait(jobs.values(), timeout=120))
    for name, job_id in jobs.items():
        result = client.result(job_id)
        assert result.image.sha256 == sha(sources[name][1]), name
        assert len(result.output.ocr) == 16, name  # scripted: the card's OCR answer for both images
    assert client.result(jobs["data"]).image.uri == "data:image/png;base64,…"  # results never copy inline images


def test_exif_orientation_is_applied(client: Client, http_files) -> None:
    result = client.result(client.submit(http_files.base + "/rotated.jpg", "caption", max_new_tokens=4), timeout=60)
    assert (result.image.width, result.image.height) == (200, 300)
    assert result.image.sha256 == sha(ROTATED)


@pytest.mark.parametrize(
    ("uri", "error_type", "message"),
    [
        ("/missing.png", "ImageFetchError", "HTTP 404"),
        ("/not-an-image.txt", "ImageDecodeError", "not a decodable image"),
        ("data:image/png;base64,!!!!not-base64", "ImageDecodeError", "broken data URI"),
        ("file:///etc/passwd", "ForbiddenURLError", "outside VARCO_FILE_ROOT"),
        (f"s3://{IMAGES_BUCKET}/in/nope.png", "ImageFetchError", "NoSuchKey"),
    ],
)
def test_bad_images_fail_with_a_typed_error_and_the_worker_keeps_serving(
    client: Client,
    http_files,
    receiver,
    uri: str,
    error_type: str,
    message: str,
) -> None:
    uri = http_files.base + uri if uri.startswith("/") else uri
    path = f"/failed/{error_type}/{len(receiver.received)}-{abs(hash(uri))}"
    job_id = client.submit(uri, "caption", callback_url=receiver.url(path))
    [status] = client.wait(job_id, timeout=60)
    assert status.state.value == "failed"
    assert status.error is not None and status.error.type == error_type and message in status.error.message
    assert status.attempts == 1  # permanent: not retried
    with pytest.raises(JobFailed, match=error_type):
        client.result(job_id)
    posts = receiver.wait_for(lambda got: any(r.path == path and b"job.failed" in r.body for r in got))
    failed = [verify(SECRET, r.headers, r.body) for r in posts if r.path == path and b"job.failed" in r.body]
    assert failed[0]["error"]["type"] == error_type and failed[0]["state"] == "failed"
    # The same worker still serves.
    ok = client.submit(http_files.base + "/cat.png", "caption")
    assert next(client.wait(ok, timeout=60)).state.value == "succeeded"


def test_transient_failures_retry_with_backoff_then_succeed(client: Client, http_files) -> None:
    url = http_files.add("/flaky.png", CAT, failures=[503, 503])
    job_id = client.submit(url, "caption")
    [status] = client.wait(job_id, timeout=90)
    assert status.state.value == "succeeded" and status.attempts == 3
    route = http_files.routes["/flaky.png"]
    assert route.hits == 3
    # Backoff, not a retry loop: retry n waits at least half of 2**(n-1) seconds (full jitter over [0.5, 1]).
    first_wait, second_wait = (b - a for a, b in itertools.pairwise(route.hit_times))
    assert first_wait >= 0.5 and second_wait >= 1.0, (first_wait, second_wait)


def test_transient_failures_give_up_after_max_attempts(client: Client, http_files) -> None:
    url = http_files.add("/down.png", CAT, status=503)
    [status] = client.wait(client.submit(url, "caption"), timeout=90)
    assert status.state.value == "failed" and status.attempts == 3
    assert status.error.type == "ImageFetchError" and "503" in status.error.message


def test_callbacks_arrive_signed(client: Client, http_files, receiver) -> None:
    job_id = client.submit(http_files.base + "/cat.png", "grounding", callback_url=receiver.url("/hook/ok"),
                           max_new_tokens=1024, metadata={"photo": 81})  # fmt: skip
    posts = receiver.wait_for(lambda got: sum(r.path == "/hook/ok" for r in got) >= 2)
    events = {}
    for post in (p for p in posts if p.path == "/hook/ok"):
        payload = verify(SECRET, post.headers, post.body)
        # The Standard Webhooks reference library, as a receiver in another stack would use it, agrees.
        assert standardwebhooks.Webhook(SECRET).verify(post.body, dict(post.headers)) == payload
        assert post.headers["webhook-id"] == f"{job_id}.{payload['type']}"
        events[payload["type"]] = payload
    assert set(events) == {"job.started", "job.succeeded"}
    done = events["job.succeeded"]
    assert set(done) == {"type", "job_id", "task", "state", "result_uri", "error", "metadata", "tenant", "timestamp"}
    assert (done["job_id"], done["state"], done["error"]) == (job_id, "succeeded", None)
    assert (done["task"], done["metadata"]) == ("grounding", {"photo": 81})  # no lookup needed
    assert (events["job.started"]["task"], events["job.started"]["metadata"]) == ("grounding", {"photo": 81})
    assert done["result_uri"] == f"s3://{RESULTS_BUCKET}/jobs/{job_id}.json"
    # This job's own post: the receiver is shared, and another test's job.failed post would not change here.
    own = next(p for p in posts if p.path == "/hook/ok")
    tampered = own.body.replace(b"succeeded", b"failed").replace(b"started", b"failed")
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, own.headers, tampered)


def test_callback_events_filter(client: Client, http_files, receiver) -> None:
    job_id = client.submit(http_files.base + "/cat.png", "caption", callback_url=receiver.url("/hook/only-done"),
                           callback_events=["job.succeeded"])  # fmt: skip
    next(client.wait(job_id, timeout=60))
    receiver.wait_for(lambda got: any(r.path == "/hook/only-done" for r in got))
    # A later job's events are queued after any this job could have sent: once they have arrived, a
    # wrongly sent job.started would have arrived too.
    later = client.submit(http_files.base + "/cat.png", "caption", callback_url=receiver.url("/hook/after-only-done"))
    next(client.wait(later, timeout=60))
    receiver.wait_for(lambda got: any(r.path == "/hook/after-only-done" and b"job.succeeded" in r.body for r in got))
    posts = [json.loads(p.body)["type"] for p in receiver.received if p.path == "/hook/only-done"]
    assert posts == ["job.succeeded"]


def test_a_dead_receiver_never_fails_the_job(client: Client, http_files, receiver) -> None:
    receiver.status_for = lambda path: 500 if path == "/hook/broken" else 204
    job_id = client.submit(http_files.base + "/cat.png", "caption", callback_url=receiver.url("/hook/broken"))
    assert next(client.wait(job_id, timeout=60)).state.value == "succeeded"
    # Retried with backoff: the receiver sees the same event more than once.
    receiver.wait_for(lambda got: sum(r.path == "/hook/broken" and b"job.succeeded" in r.body for r in got) >= 2)


def test_sixty_jobs_at_once_none_lost_none_duplicated(client: Client, http_files, s3) -> None:
    url = http_files.base + "/cat.png"
    job_ids = client.submit_many([{"image_uri": url, "task": "caption", "metadata": {"n": i}} for i in range(60)])
    assert len(set(job_ids)) == 60
    statuses = list(client.wait(job_ids, timeout=300))
    assert sorted(s.job_id for s in statuses) == sorted(job_ids)
    assert all(s.state.value == "succeeded" and s.attempts == 1 for s in statuses)
    for n, job_id in enumerate(job_ids):
        assert stored_result(s3, job_id)["metadata"] == {"n": n}


def parked_client(settings, name: str) -> Client:
    """A client whose every task type goes to a queue no worker reads: what it enqueues stays countable."""
    return Client(settings.model_copy(update={"task_routes": {task: name for task in SUBMITTED_TASKS}}))


SUBMITTED_TASKS = ("caption", "grounding", "referring", "ocr", "vqa")


def test_idempotency_key_gives_one_job(client: Client, settings, http_files) -> None:
    url = http_files.base + "/cat.png"
    # Enqueued once: on a queue nobody consumes, the second submit adds no message.
    parked = parked_client(settings, "varco.parked-idempotency")
    try:
        depth = queue_depth(parked.redis, "varco.parked-idempotency")
        job = parked.submit(url, "caption", idempotency_key="order-43")
        assert parked.submit(url, "caption", idempotency_key="order-43") == job
        assert queue_depth(parked.redis, "varco.parked-idempotency") == depth + 1
        assert parked.cancel(job) is True
    finally:
        parked.close()
    # And run once by a worker.
    first = client.submit(url, "caption", idempotency_key="order-42")
    second = client.submit(url, "caption", idempotency_key="order-42")
    assert first == second
    assert next(client.wait(first, timeout=60)).attempts == 1


def test_bad_requests_are_refused_before_enqueueing(settings, http_files) -> None:
    parked = parked_client(settings, "varco.parked-refused")  # nothing consumes it, so nothing vanishes from it
    try:
        queued_before = queue_depth(parked.redis, "varco.parked-refused")
        with pytest.raises(ValueError, match="needs a prompt"):
            parked.submit(http_files.base + "/cat.png", "vqa")
        with pytest.raises(InvalidRequest, match="request #1"):
            parked.submit_many([{"image_uri": http_files.base + "/cat.png", "task": "caption"},
                                {"image_uri": "gopher://x", "task": "caption"}])  # fmt: skip
        with pytest.raises(InvalidRequest, match="VARCO_MAX_DATA_URI_BYTES"):
            parked.submit("data:image/png;base64," + base64.b64encode(b"x" * 70_000).decode(), "caption")
        assert queue_depth(parked.redis, "varco.parked-refused") == queued_before
        # The queue does count what is enqueued.
        parked.cancel(parked.submit(http_files.base + "/cat.png", "caption"))
        assert queue_depth(parked.redis, "varco.parked-refused") == queued_before + 1
    finally:
        parked.close()
