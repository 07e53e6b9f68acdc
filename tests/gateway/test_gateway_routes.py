"""The gateway's request mapping, in this process: HTTP bodies, headers and keys -> Client calls -> answers.

The app runs under a real uvicorn server (a thread of this process, so `make mutants` sees the code it
runs) over a real redis-server, with no worker: jobs stay queued unless a test moves them on the way a
worker would (status transitions, a result file). tests/integration/test_gateway.py covers the whole
pipeline with the gateway as its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
import uvicorn
from fastapi.exceptions import RequestValidationError
from images import png
from prometheus_client.parser import text_string_to_metric_families

from varco.gateway.app import create_app
from varco.gateway.auth import KeyRing, key_id
from varco.gateway.public_view import public_model
from varco.producer import Client
from varco.tasks.celery_app import INFER_QUEUE
from varco.tasks.results_store import FileResultStore
from varco.tasks.schemas import ErrorInfo, JobState
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import LocalRedis, free_port, start_redis

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
IMAGE = "https://images.example/cat.png"
JOB = {"image_uri": IMAGE, "task": "caption"}
MAX_BATCH = 3
TITLES = {401: "Unauthorized", 404: "Not found", 405: "Method not allowed", 409: "Conflict", 422: "Invalid request",
          429: "Too many requests", 503: "Service unavailable"}  # fmt: skip


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with start_redis(tmp_path_factory.mktemp("redis-gateway")) as server:
        yield server


@pytest.fixture(scope="module")
def settings(redis_server: LocalRedis, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    results = tmp_path_factory.mktemp("results")
    return Settings(broker_url=redis_server.url, result_store=results.as_uri() + "/", gateway_max_batch=MAX_BATCH)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


@contextlib.contextmanager
def serve(settings: Settings, keys: list[str] | None, client: Client, app: Any = None) -> Iterator[str]:
    """The app (or `create_app`'s) on a real uvicorn server in a thread; yields its base URL once it listens."""
    port = free_port()
    app = app or create_app(settings, keys, client=client)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # uvicorn sets it once the socket listens
        assert thread.is_alive() and time.monotonic() < deadline, "gateway never started"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def base(settings: Settings, client: Client) -> Iterator[str]:
    """A gateway per test: `make mutants` then sees every test reach the app's set-up (create_app)."""
    with serve(settings, [ALICE, BOB], client) as url:
        yield url


@pytest.fixture(autouse=True)
def clean(client: Client) -> None:
    client.redis.flushdb()


def api(base: str, key: str | None = ALICE) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"urn:varco:problem:{kind}" and body["status"] == status, body
    assert body["title"] == TITLES[status]
    return body


def enqueued(client: Client) -> list[dict[str, Any]]:
    """The job requests waiting in the fair queue, oldest first (no worker reads it here), after checking that
    each has its ticket on the broker queue (kombu keeps one Redis list per priority level, `varco:5`, ...)."""
    lists = [k for k in client.redis.scan_iter(f"{INFER_QUEUE}*") if client.redis.type(k) == "list"]
    tickets = sum(client.redis.llen(key) for key in lists)
    waiting = [
        m
        for key in client.redis.scan_iter(f"varco:fair:{INFER_QUEUE}:t:*")
        for m in client.redis.zrange(key, 0, -1, withscores=True)
    ]
    order = [job_id for job_id, score in sorted(waiting, key=lambda m: m[1] % 2**40)]  # submission order
    assert tickets == len(order)
    return [json.loads(client.redis.hget(f"varco:fair:job:{j}", "body"))["args"][1] for j in order]


def records(client: Client) -> int:
    return sum(1 for _ in client.redis.scan_iter("varco:job:*"))


# --- submit ----------------------------------------------------------------------------------


def test_submit_enqueues_the_request_under_the_callers_key(base: str, client: Client) -> None:
    with api(base) as http:
        response = http.post("/v1/jobs", json={**JOB, "prompt": "What is this?", "metadata": {"order": 7}})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.json()["status_url"] == response.headers["location"] == f"/v1/jobs/{job_id}"
    assert client.statuses.record(job_id)["owner"] == key_id(ALICE)
    [request] = enqueued(client)
    assert request["image_uri"] == IMAGE and request["prompt"] == "What is this?"
    assert request["metadata"] == {"order": 7}


def test_a_named_key_submits_as_its_tenant_a_nameless_key_as_its_own(settings: Settings, client: Client) -> None:
    with serve(settings, [f"teamA:{ALICE}", BOB], client) as url, api(url) as alice, api(url, BOB) as bob:
        a = alice.post("/v1/jobs", json=JOB).json()["job_id"]
        b = bob.post("/v1/jobs/batch", json={"jobs": [JOB]}).json()["job_ids"][0]
        refused = alice.post("/v1/jobs", json={**JOB, "tenant": "teamB"})  # a key cannot borrow a share
        assert alice.get(f"/v1/jobs/{a}").json()["tenant"] == "teamA"
    assert client.statuses.record(a)["owner"] == key_id(ALICE)  # the key id, as before: the name is no secret
    assert [r["tenant"] for r in enqueued(client)] == ["teamA", key_id(BOB)]
    assert client.statuses.record(b)["tenant"] == key_id(BOB)
    assert problem(refused, 422, "invalid-request")["field"] == "tenant"


def test_a_tenant_over_its_queued_limit_gets_a_429_queue_full(settings: Settings, client: Client) -> None:
    limited = settings.model_copy(update={"max_queued_per_tenant": 2})
    with Client(limited) as own, serve(limited, [f"teamA:{ALICE}", BOB], own) as url, api(url) as http:
        assert http.post("/v1/jobs", json=JOB).status_code == 202
        full = http.post("/v1/jobs/batch", json={"jobs": [JOB, JOB]})  # all or nothing
        body = problem(full, 429, "queue-full")
        assert (body["limit"], body["depth"]) == (2, 1) and full.headers["retry-after"] == "5"
        assert "teamA" in body["detail"] and "VARCO_MAX_QUEUED_PER_TENANT" in body["detail"]
        assert http.post("/v1/jobs", json=JOB).status_code == 202
        with api(url, BOB) as bob:  # another tenant has its own limit
            assert bob.post("/v1/jobs", json=JOB).status_code == 202
    assert len(enqueued(client)) == 3


@pytest.mark.parametrize(
    ("body", "kind", "detail"),
    [
        (b"{not json", "invalid-json", "request body is not JSON: "),
        (b'["a list"]', "invalid-request", "invalid job request: expected a JSON object"),
        (b'{"image_uri": "https://x/y.png", "task": "caption", "colour": 1}', "invalid-request",
         "invalid job request: colour: Extra inputs are not permitted"),
        (b'{"image_uri": "https://x/y.png", "task": "poetry"}', "invalid-request", "task"),
    ],
)  # fmt: skip
def test_a_bad_body_is_a_422_problem_and_enqueues_nothing(
    base: str, client: Client, body: bytes, kind: str, detail: str
) -> None:
    with api(base) as http:
        answer = problem(http.post("/v1/jobs", content=body), 422, kind)
    assert detail in answer["detail"] and "request #" not in answer["detail"]
    assert "index" not in answer
    assert records(client) == 0 and enqueued(client) == []


def test_a_bad_field_is_named(base: str) -> None:
    with api(base) as http:
        unknown = problem(http.post("/v1/jobs", json={**JOB, "colour": 1, "zoom": 2}), 422, "invalid-request")
        task = problem(http.post("/v1/jobs", json={**JOB, "task": "poetry"}), 422, "invalid-request")
    assert unknown["field"] == "colour"  # the first, in sorted order
    assert task["field"] == "task"


@pytest.mark.parametrize(
    ("body", "field"),
    [({"task": "vqa"}, "prompt"), ({"task": "ocr", "prompt": "read"}, "prompt"), ({"task": "referring"}, "region"),
     ({"task": "caption", "label": "cat"}, "label"), ({"task": "caption", "region": [0, 0, 1, 1]}, "region")],
)  # fmt: skip
def test_a_check_across_fields_still_names_the_field(base: str, body: dict[str, Any], field: str) -> None:
    with api(base) as http:
        refused = problem(http.post("/v1/jobs", json={"image_uri": IMAGE, **body}), 422, "invalid-request")
    assert refused["field"] == field


def test_idempotency_key_from_header_or_body_per_api_key(base: str, client: Client) -> None:
    with api(base) as alice, api(base, BOB) as bob:
        first = alice.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-1"}).json()["job_id"]
        again = alice.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-1"}).json()["job_id"]
        in_body = alice.post("/v1/jobs", json={**JOB, "idempotency_key": "order-1"}).json()["job_id"]
        # The header wins over the body's key.
        header_wins = alice.post(
            "/v1/jobs", json={**JOB, "idempotency_key": "other"}, headers={"Idempotency-Key": "order-1"}
        ).json()["job_id"]
        bobs = bob.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-1"}).json()["job_id"]
    assert first == again == in_body == header_wins
    assert bobs != first  # one key's Idempotency-Key never names another key's job
    assert len(enqueued(client)) == 2


def test_an_idempotency_key_reused_with_another_body_is_refused(base: str, client: Client) -> None:
    ocr = {"image_uri": IMAGE, "task": "ocr"}
    with api(base) as http:
        first = http.post("/v1/jobs", json=ocr, headers={"Idempotency-Key": "scan-1"}).json()["job_id"]
        again = http.post("/v1/jobs", json={**ocr, "metadata": {}}, headers={"Idempotency-Key": "scan-1"})
        other = http.post("/v1/jobs", json={**ocr, "task": "grounding"}, headers={"Idempotency-Key": "scan-1"})
        refused = problem(other, 422, "idempotency-key-reused")
        batch = http.post("/v1/jobs/batch", json={"jobs": [JOB, {**JOB, "idempotency_key": "scan-1"}]})
        in_batch = problem(batch, 422, "idempotency-key-reused")
    assert again.status_code == 202 and again.json()["job_id"] == first  # defaults as given: the same request
    assert refused["field"] == "idempotency_key" and first in refused["detail"] and "index" not in refused
    assert in_batch["index"] == 1 and in_batch["detail"].startswith("request #1: ")
    assert len(enqueued(client)) == 1  # neither the other body nor any job of the batch ran


@pytest.mark.parametrize("key", ["", "k" * 129, 7, ["order-1"]])
def test_an_idempotency_key_out_of_bounds_is_refused(base: str, client: Client, key: Any) -> None:
    with api(base) as http:
        answer = problem(http.post("/v1/jobs", json={**JOB, "idempotency_key": key}), 422, "invalid-request")
    assert answer["field"] == "idempotency_key" and answer["detail"] == "idempotency key must be 1..128 characters"
    assert records(client) == 0


def test_idempotency_keys_of_one_and_of_128_characters_are_taken(base: str, client: Client) -> None:
    with api(base) as http:
        short = http.post("/v1/jobs", json={**JOB, "idempotency_key": "k"})
        longest = http.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "k" * 128})
    assert short.status_code == longest.status_code == 202
    assert short.json()["job_id"] != longest.json()["job_id"] and len(enqueued(client)) == 2


# --- batch -----------------------------------------------------------------------------------


def test_a_batch_is_enqueued_in_order(base: str, client: Client) -> None:
    jobs = [{**JOB, "metadata": {"n": n}} for n in range(MAX_BATCH)]
    with api(base) as http:
        response = http.post("/v1/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 202, response.text
    ids = response.json()["job_ids"]
    assert response.json()["status_urls"] == [f"/v1/jobs/{j}" for j in ids]
    assert [r["metadata"]["n"] for r in enqueued(client)] == list(range(MAX_BATCH))
    assert {client.statuses.record(j)["owner"] for j in ids} == {key_id(ALICE)}


@pytest.mark.parametrize(
    "body",
    [[JOB], {"jobs": []}, {"jobs": JOB}, {"jobs": [JOB], "priority": 1}, {"job": [JOB]}, "jobs"],
)
def test_a_batch_body_of_the_wrong_shape_is_refused(base: str, client: Client, body: Any) -> None:
    with api(base) as http:
        answer = problem(http.post("/v1/jobs/batch", json=body), 422, "invalid-request")
    assert answer["field"] == "jobs" and answer["detail"] == 'body must be {"jobs": [job, ...]} with at least one job'
    assert records(client) == 0


def test_a_batch_over_the_limit_is_refused(base: str, client: Client) -> None:
    with api(base) as http:
        answer = problem(http.post("/v1/jobs/batch", json={"jobs": [JOB] * (MAX_BATCH + 1)}), 422, "invalid-request")
    assert answer["detail"] == f"{MAX_BATCH + 1} jobs in one batch; the limit is {MAX_BATCH} (VARCO_GATEWAY_MAX_BATCH)"
    assert answer["field"] == "jobs" and records(client) == 0


@pytest.mark.parametrize(
    ("bad", "detail", "field"),
    [
        ("not an object", "request #1: invalid job request: expected a JSON object", None),
        ({**JOB, "zoom": 2}, "request #1: invalid job request: zoom: Extra inputs are not permitted", "zoom"),
        ({**JOB, "idempotency_key": ""}, "request #1: idempotency key must be 1..128 characters", "idempotency_key"),
        ({**JOB, "task": "poetry"}, "request #1: invalid job request: task: ", "task"),
    ],
)
def test_one_bad_job_refuses_the_batch_and_says_which(
    base: str, client: Client, bad: Any, detail: str, field: str | None
) -> None:
    with api(base) as http:
        answer = problem(http.post("/v1/jobs/batch", json={"jobs": [JOB, bad, JOB]}), 422, "invalid-request")
    assert answer["detail"].startswith(detail) and answer["index"] == 1
    assert answer.get("field") == field
    assert records(client) == 0 and enqueued(client) == []


def test_batch_jobs_take_their_own_idempotency_keys(base: str, client: Client) -> None:
    jobs = [{**JOB, "idempotency_key": "a"}, {**JOB, "idempotency_key": "b"}, {**JOB, "idempotency_key": "a"}]
    with api(base) as alice, api(base, BOB) as bob:
        first, second, repeat = alice.post("/v1/jobs/batch", json={"jobs": jobs}).json()["job_ids"]
        single = alice.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "a"}).json()["job_id"]
        [bobs] = bob.post("/v1/jobs/batch", json={"jobs": jobs[:1]}).json()["job_ids"]
    assert first == repeat == single and second != first and bobs not in (first, second)


# --- reading, ownership and keys --------------------------------------------------------------


def test_another_keys_job_is_not_found_like_an_unknown_one(base: str) -> None:
    with api(base) as alice, api(base, BOB) as bob:
        job_id = alice.post("/v1/jobs", json=JOB).json()["job_id"]
        assert alice.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
        theirs = problem(bob.get(f"/v1/jobs/{job_id}"), 404, "job-not-found")
        unknown = problem(bob.get(f"/v1/jobs/{'0' * 32}"), 404, "job-not-found")
        problem(bob.delete(f"/v1/jobs/{job_id}"), 404, "job-not-found")
        problem(bob.get(f"/v1/jobs/{job_id}/result"), 404, "job-not-found")
    assert theirs["detail"] == f"no such job: {job_id}" and unknown["detail"] == f"no such job: {'0' * 32}"


def test_missing_wrong_and_non_bearer_keys_are_401(base: str, client: Client) -> None:
    with api(base, None) as anonymous, api(base, "not-a-key") as wrong:
        missing = problem(anonymous.post("/v1/jobs", json=JOB), 401, "unauthorized")
        basic = problem(anonymous.post("/v1/jobs", json=JOB, headers={"Authorization": f"Basic {ALICE}"}), 401,
                        "unauthorized")  # fmt: skip
        unknown = wrong.post("/v1/jobs", json=JOB)
    assert missing["detail"] == basic["detail"] == "missing API key: send 'Authorization: Bearer <key>'"
    assert problem(unknown, 401, "unauthorized")["detail"] == "unknown API key"
    assert unknown.headers["www-authenticate"] == 'Bearer realm="varco"'
    assert records(client) == 0


def test_a_page_token_reads_its_own_job_only_and_only_by_get(base: str) -> None:
    ring = KeyRing([ALICE, BOB])
    with api(base) as alice, api(base, None) as page:
        job_id, other = (alice.post("/v1/jobs", json=JOB).json()["job_id"] for _ in range(2))
        token = ring.page_token(key_id(ALICE), job_id)
        assert page.get(f"/v1/jobs/{job_id}", params={"token": token}).json()["job_id"] == job_id
        stranger = problem(page.get(f"/v1/jobs/{other}", params={"token": token}), 401, "unauthorized")
        assert stranger["detail"] == "page token is invalid or expired: reload the page with the API key"
        # Not a way to cancel: a token never authenticates anything but a read.
        problem(page.delete(f"/v1/jobs/{job_id}", params={"token": token}), 401, "unauthorized")
        # Bob's token for Alice's job names Bob, who does not own it.
        bobs = ring.page_token(key_id(BOB), job_id)
        problem(page.get(f"/v1/jobs/{job_id}", params={"token": bobs}), 404, "job-not-found")
        # With a key, the key decides and the token is ignored.
        assert alice.get(f"/v1/jobs/{other}", params={"token": token}).status_code == 200
        assert alice.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"


def test_rate_limit_is_per_key_and_says_when_to_retry(settings: Settings, client: Client) -> None:
    slow = settings.model_copy(update={"rate_limit": 0.001})  # a bucket of one, refilled once in 1000 s
    with serve(slow, [ALICE, BOB], client) as base, api(base) as alice, api(base, BOB) as bob:
        job_id = alice.post("/v1/jobs", json=JOB).json()["job_id"]
        limited = alice.post("/v1/jobs", json=JOB)
        answer = problem(limited, 429, "rate-limited")
        problem(alice.get(f"/v1/jobs/{job_id}"), 429, "rate-limited")  # reads count too
        assert bob.post("/v1/jobs", json=JOB).status_code == 202
    assert answer["detail"] == "over VARCO_RATE_LIMIT (0.001 requests/s) for this key"
    assert 990 <= int(limited.headers["retry-after"]) <= 1000
    assert len(enqueued(client)) == 2


def test_without_keys_everyone_is_one_anonymous_caller(settings: Settings, client: Client) -> None:
    with serve(settings, None, client) as base, api(base, None) as http:
        job_id = http.post("/v1/jobs", json=JOB).json()["job_id"]
        assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
        # Without keys every job is everyone's, also one a Python producer submitted with no owner.
        python_job = client.submit(IMAGE, "caption")
        assert http.get(f"/v1/jobs/{python_job}").json()["job_id"] == python_job
    assert client.statuses.record(job_id)["owner"] == "anonymous"


# --- results and cancels ----------------------------------------------------------------------


def finish(client: Client, job_id: str, state: JobState, **fields: Any) -> None:
    """Move a job on as a worker would."""
    client.statuses.begin_attempt(job_id, "gpu0@test", max_attempts=3)
    assert client.statuses.transition(job_id, state, **fields)


def result_json(job_id: str) -> bytes:
    return json.dumps({
        "job_id": job_id, "task": "caption", "state": "succeeded", "model": "tiny", "prompt": "p",
        "image": {"uri": IMAGE, "width": 4, "height": 3, "sha256": "0" * 64},
        "output": {"raw": "a cat", "text": "a cat"},
    }).encode()  # fmt: skip


def test_result_of_each_state(base: str, client: Client, settings: Settings) -> None:
    store = FileResultStore(settings.result_store)
    with api(base) as http:
        queued, running, failed, cancelled, done, lost = (
            http.post("/v1/jobs", json=JOB).json()["job_id"] for _ in range(6)
        )
        client.statuses.begin_attempt(running, "gpu0@test", max_attempts=3)
        finish(client, failed, JobState.FAILED, error=ErrorInfo(type="ImageFetchError", message="404 from origin"))
        assert http.delete(f"/v1/jobs/{cancelled}").json()["state"] == "cancelled"
        finish(client, done, JobState.SUCCEEDED, result_uri=store.write(done, result_json(done)))
        finish(client, lost, JobState.SUCCEEDED, result_uri=store.uri_for(lost))  # the object is gone
        unexplained = http.post("/v1/jobs", json=JOB).json()["job_id"]
        finish(client, unexplained, JobState.FAILED)  # a failure recorded without an error

        assert problem(http.get(f"/v1/jobs/{queued}/result"), 409, "job-not-finished")["state"] == "queued"
        assert problem(http.get(f"/v1/jobs/{running}/result"), 409, "job-not-finished")["detail"] == (
            f"job {running} is started"
        )
        failure = problem(http.get(f"/v1/jobs/{failed}/result"), 409, "job-failed")
        assert failure["detail"] == f"job {failed} failed" and failure["state"] == "failed"
        assert failure["error"] == {"type": "ImageFetchError", "message": "404 from origin"}
        assert "error" not in problem(http.get(f"/v1/jobs/{unexplained}/result"), 409, "job-failed")
        gone = problem(http.get(f"/v1/jobs/{cancelled}/result"), 409, "job-cancelled")
        assert gone["detail"] == f"job {cancelled} was cancelled" and gone["state"] == "cancelled"
        result = http.get(f"/v1/jobs/{done}/result")
        assert result.status_code == 200 and result.json()["output"]["text"] == "a cat"
        missing = problem(http.get(f"/v1/jobs/{lost}/result"), 503, "result-unavailable")
        assert missing["detail"].startswith("result could not be read: FileNotFoundError")
        # The overlay answers the same 409s before it reads anything.
        problem(http.get(f"/v1/jobs/{queued}/overlay.png"), 409, "job-not-finished")
        problem(http.get(f"/v1/jobs/{failed}/overlay.png"), 409, "job-failed")


def test_callers_see_gateway_urls_never_the_store_or_the_workers_paths(
    base: str, client: Client, settings: Settings
) -> None:
    store = FileResultStore(settings.result_store)
    picture = png(4, 3)
    with api(base) as http:
        job_id, bare = (http.post("/v1/jobs", json=JOB).json()["job_id"] for _ in range(2))
        body = json.loads(result_json(job_id)) | {"model": "/srv/models/varco-vision-14b/"}
        body["image"]["kept_uri"] = store.write_image(job_id, picture)
        finish(client, job_id, JobState.SUCCEEDED, result_uri=store.write(job_id, json.dumps(body).encode()))
        finish(client, bare, JobState.SUCCEEDED, result_uri=store.write(bare, result_json(bare)))  # no image kept
        status = http.get(f"/v1/jobs/{job_id}").json()
        result = http.get(f"/v1/jobs/{job_id}/result").json()
        events = http.get(f"/v1/jobs/{job_id}/events").text
        image = http.get(result["image"]["kept_uri"])
        not_kept = problem(http.get(f"/v1/jobs/{bare}/image"), 409, "image-unavailable")
        bare_result = http.get(f"/v1/jobs/{bare}/result").json()
    assert status["result_uri"] == f"/v1/jobs/{job_id}/result"
    assert result["image"]["kept_uri"] == f"/v1/jobs/{job_id}/image" and result["model"] == "varco-vision-14b"
    assert f'"result_uri":"/v1/jobs/{job_id}/result"' in events
    assert "file://" not in events + json.dumps(status) + json.dumps(result)
    assert image.status_code == 200 and image.content == picture and image.headers["content-type"] == "image/png"
    assert "VARCO_KEEP_IMAGES=false" in not_kept["detail"] and bare_result["image"]["kept_uri"] is None
    assert bare_result["model"] == "tiny"  # a name that is no path is shown as it is
    assert (client.status(job_id).result_uri or "").startswith("file://")  # Python callers, inside, keep them


def kept_jobs(http: httpx.Client, client: Client, store: FileResultStore, n: int) -> list[str]:
    """`n` succeeded jobs, each with a kept image, as a worker leaves them."""
    job_ids = [http.post("/v1/jobs", json=JOB).json()["job_id"] for _ in range(n)]
    for job_id in job_ids:
        body = json.loads(result_json(job_id))
        body["image"]["kept_uri"] = store.write_image(job_id, png(4, 3))
        finish(client, job_id, JobState.SUCCEEDED, result_uri=store.write(job_id, json.dumps(body).encode()))
    return job_ids


def test_an_overlay_is_drawn_once_and_kept_beside_the_result(
    base: str, client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from varco.gateway import overlay

    store, draws = FileResultStore(settings.result_store), []
    draw = overlay.draw_overlay
    monkeypatch.setattr(overlay, "draw_overlay", lambda *a, **k: draws.append(1) or draw(*a, **k))
    with api(base) as http:
        [job_id] = kept_jobs(http, client, store, 1)
        first, again = (http.get(f"/v1/jobs/{job_id}/overlay.png") for _ in range(2))
        problem(api(base, BOB).get(f"/v1/jobs/{job_id}/overlay.png"), 404, "job-not-found")  # kept, still owned
    assert first.status_code == again.status_code == 200 and first.content == again.content
    assert len(draws) == 1 and store.read(store.overlay_uri(job_id)) == first.content


def test_overlays_are_drawn_at_most_n_at_once_and_the_rest_wait(
    settings: Settings, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from varco.gateway import overlay

    store, release = FileResultStore(settings.result_store), threading.Event()
    active, most = [0], [0]
    draw = overlay.draw_overlay

    def slow_draw(*args: Any, **kwargs: Any) -> Any:
        active[0] += 1
        most[0] = max(most[0], active[0])
        release.wait(30)
        active[0] -= 1
        return draw(*args, **kwargs)

    monkeypatch.setattr(overlay, "draw_overlay", slow_draw)
    app = create_app(settings.model_copy(update={"gateway_overlay_renders": 1}), [ALICE], client=client)
    with serve(settings, [ALICE], client, app) as url, api(url) as http:
        jobs = kept_jobs(http, client, store, 4)
        answers: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda j=j: answers.append(api(url).get(f"/v1/jobs/{j}/overlay.png")))
                   for j in jobs]  # fmt: skip
        for thread in threads:
            thread.start()
        renders = app.state.gateway.overlay_renders
        # One draws while three wait their turn (or, uncapped, a second draws). The one that holds the turn
        # reads the result before it draws: wait for its draw too, not only for the three in line.
        deadline = time.monotonic() + 30
        while not (len(renders._waiters or ()) == 3 and active[0] == 1) and most[0] < 2:
            assert time.monotonic() < deadline, (len(renders._waiters or ()), active[0])
            time.sleep(0.01)
        assert most[0] == 1 and active[0] == 1
        release.set()
        for thread in threads:
            thread.join()
    assert sorted(a.status_code for a in answers) == [200] * 4 and most[0] == 1


@pytest.mark.parametrize(
    ("model", "shown"),
    [("NCSOFT/VARCO-VISION-14B-HF", "NCSOFT/VARCO-VISION-14B-HF"), ("/srv/models/varco", "varco"),
     ("file:///srv/models/varco/", "varco"), ("./models/tiny", "tiny"), ("C:\\models\\varco", "varco")],
)  # fmt: skip
def test_a_local_model_directory_is_shown_by_its_name(model: str, shown: str) -> None:
    assert public_model(model) == shown


def test_result_wait_is_bounded(base: str) -> None:
    with api(base) as http:
        job_id = http.post("/v1/jobs", json=JOB).json()["job_id"]
        too_long = problem(http.get(f"/v1/jobs/{job_id}/result", params={"wait": 61}), 422, "invalid-request")
        assert too_long["field"] == "wait"
        assert too_long["detail"] == "invalid request: wait: Input should be less than or equal to 60"
        # Every refused parameter is named, in one message; `field` is the first.
        both = problem(http.get("/v1/jobs/-bad/result", params={"wait": -1}), 422, "invalid-request")
        assert both["field"] == "job_id" and both["detail"].startswith("invalid request: job_id: String should match")
        assert both["detail"].endswith("; wait: Input should be greater than or equal to 0")
        problem(http.get(f"/v1/jobs/{job_id}/result", params={"wait": 0.2}), 409, "job-not-finished")


def event_frames(http: httpx.Client, job_id: str, last_event_id: str | None = None) -> list[str]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as stream:
        assert stream.status_code == 200, stream.read()
        return [f for f in stream.read().decode().split("\n\n") if f]


def test_events_resume_after_their_last_event_id_and_a_reconnect_after_the_end_is_204(
    base: str, client: Client
) -> None:
    with api(base) as http:
        job_id = http.post("/v1/jobs", json=JOB).json()["job_id"]
        before = http.get(f"/v1/jobs/{job_id}").json()["updated_at"]
        finish(client, job_id, JobState.SUCCEEDED)
        frames = event_frames(http, job_id)
        assert [f.splitlines()[0] for f in frames] == ["retry: 5000", "event: status", "event: end"]
        final_id = frames[1].splitlines()[1].removeprefix("id: ")
        assert final_id == client.status(job_id).updated_at.isoformat()  # type: ignore[union-attr]
        assert json.loads(frames[2].splitlines()[1].removeprefix("data: ")) == {"job_id": job_id, "state": "succeeded"}
        # EventSource reconnects with the last id it saw: after the end, 204 tells it to stop.
        ended = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": final_id})
        assert ended.status_code == 204 and ended.content == b""
        # An id before the final status: the events after it; an id that is not ours: the whole stream.
        assert event_frames(http, job_id, before)[1:] == frames[1:]
        assert event_frames(http, job_id, "not-an-id") == frames


def test_event_streams_over_the_per_key_cap_are_refused(settings: Settings, client: Client) -> None:
    capped = settings.model_copy(update={"gateway_max_streams_per_key": 1})
    with serve(capped, [ALICE, BOB], client) as url, api(url) as alice, api(url, BOB) as bob:
        job_id = alice.post("/v1/jobs", json=JOB).json()["job_id"]
        bobs = bob.post("/v1/jobs", json=JOB).json()["job_id"]
        with alice.stream("GET", f"/v1/jobs/{job_id}/events") as open_one:
            assert open_one.status_code == 200
            refused = alice.get(f"/v1/jobs/{job_id}/events")
            body = problem(refused, 429, "too-many-streams")
            assert int(refused.headers["retry-after"]) > 0 and body["limit"] == 1
            with bob.stream("GET", f"/v1/jobs/{bobs}/events") as other_key:
                assert other_key.status_code == 200  # the cap is per key
        finish(client, job_id, JobState.SUCCEEDED)
        deadline = time.monotonic() + 30
        while (again := alice.get(f"/v1/jobs/{job_id}/events")).status_code == 429:  # the slot comes back
            assert time.monotonic() < deadline, "the closed stream's slot never came back"
            time.sleep(0.05)
        assert again.status_code == 200 and "event: end" in again.text


def test_cancel_a_queued_job_then_again(base: str, client: Client) -> None:
    with api(base) as http:
        job_id = http.post("/v1/jobs", json=JOB).json()["job_id"]
        assert http.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
        again = problem(http.delete(f"/v1/jobs/{job_id}"), 409, "job-finished")
        assert again["detail"] == f"job {job_id} already finished (cancelled)" and again["state"] == "cancelled"
        running = http.post("/v1/jobs", json=JOB).json()["job_id"]
        client.statuses.begin_attempt(running, "gpu0@test", max_attempts=3)
        # A running job stays started, with the cancel on its way to its worker.
        assert http.delete(f"/v1/jobs/{running}").json()["state"] == "started"
    assert client.statuses.cancel_requested(running)


# --- problem documents and the API description ------------------------------------------------


def test_unknown_paths_and_methods_are_problems(base: str) -> None:
    with api(base) as http:
        missing = problem(http.get("/v1/nothing-here"), 404, "not-found")
        wrong = http.put("/v1/jobs", json=JOB)
    assert missing["detail"] == "Not Found"
    assert problem(wrong, 405, "method-not-allowed")["detail"] == "Method Not Allowed"
    assert wrong.headers["allow"] == "POST"


def test_a_method_not_allowed_lists_every_method_the_path_serves(base: str) -> None:
    with api(base) as http:
        job_id = http.post("/v1/jobs", json=JOB).json()["job_id"]
        options = http.options(f"/v1/jobs/{job_id}")
        batch = http.options("/v1/jobs/batch")  # a path of its own, not a job id beside /v1/jobs/{job_id}
    assert problem(options, 405, "method-not-allowed") and options.headers["allow"] == "DELETE, GET"
    assert problem(batch, 405, "method-not-allowed") and batch.headers["allow"] == "POST"


def test_problem_documents_for_any_status_and_error() -> None:
    from starlette.exceptions import HTTPException

    from varco.gateway.problems import Problem, _on_http_error, _on_validation_error, problem_body

    assert problem_body(418, "teapot", None) == {"type": "urn:varco:problem:teapot", "title": "Error", "status": 418}
    assert str(Problem(404, "job-not-found", "no such job: x")) == "no such job: x"  # what logs show
    answer = asyncio.run(_on_http_error(None, HTTPException(400, "bad", headers={"X-Why": "test"})))
    assert json.loads(answer.body) == {"type": "urn:varco:problem:http-error", "title": "Bad request",
                                       "status": 400, "detail": "bad"}  # fmt: skip
    assert answer.headers["x-why"] == "test"
    # An error located at the whole body (no field) is reported without a field name.
    body_level = RequestValidationError([{"loc": ("body",), "msg": "Field required", "type": "missing"},
                                         {"loc": ("body", "jobs", 0), "msg": "too long", "type": "x"}])  # fmt: skip
    document = json.loads(asyncio.run(_on_validation_error(None, body_level)).body)
    assert document["detail"] == "invalid request: Field required; jobs.0: too long" and document["field"] == "jobs.0"


def test_rate_limited_for_less_than_a_second_is_still_refused() -> None:
    from varco.gateway.access import rate_limit
    from varco.gateway.problems import Problem
    from varco.gateway.ratelimit import RateLimiter

    class FrozenClock(RateLimiter):
        def acquire(self, key: str, now: float | None = None) -> float:
            return super().acquire(key, now=100.0)

    state = SimpleNamespace(limiter=FrozenClock(4.0))  # a bucket of 4; the 5th waits 0.25 s
    for _ in range(4):
        rate_limit(state, "alice")  # type: ignore[arg-type]
    with pytest.raises(Problem) as refused:
        rate_limit(state, "alice")  # type: ignore[arg-type]
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}


def test_the_api_description_documents_bodies_and_problems(base: str) -> None:
    with httpx.Client(base_url=base) as http:
        schema = http.get("/openapi.json").json()
    submit, batch = schema["paths"]["/v1/jobs"]["post"], schema["paths"]["/v1/jobs/batch"]["post"]
    for operation, body in ((submit, "JobRequest"), (batch, "JobBatch")):
        assert operation["requestBody"] == {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
        assert operation["responses"]["422"] == {
            "description": "Invalid request",
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}},
        }
        assert {"401", "408", "413", "429", "503"} <= set(operation["responses"])
    assert {"JobRequest", "JobBatch", "ProblemDetails"} <= set(schema["components"]["schemas"])


def test_the_api_description_says_what_the_server_takes_and_sends(base: str) -> None:
    with httpx.Client(base_url=base) as http:
        document = http.get("/openapi.json").json()
    schemas, paths = document["components"]["schemas"], document["paths"]
    job = schemas["JobRequest"]
    # openapi-typescript makes a property with a default required: optional inputs carry none.
    assert job["required"] == ["image_uri", "task"] and not [p for p in job["properties"].values() if "default" in p]
    assert job["properties"]["image_uri"]["minLength"] == 1 and "tenant" not in job["properties"]
    header = next(p for p in paths["/v1/jobs"]["post"]["parameters"] if p["name"] == "Idempotency-Key")
    assert header["schema"]["maxLength"] == job["properties"]["idempotency_key"]["maxLength"] == 128
    # What is always sent is required; the task is the enum.
    status = schemas["JobStatus"]
    assert set(status["required"]) == set(status["properties"])
    assert {"$ref": "#/components/schemas/TaskType"} in status["properties"]["task"]["anyOf"]
    problem_doc = schemas["ProblemDetails"]
    assert problem_doc["required"] == ["type", "title", "status", "detail"]
    assert {"field", "index", "state", "error", "enqueued"} <= set(problem_doc["properties"])
    assert paths["/v1/jobs"]["post"]["operationId"] == "submit_job"
    assert paths["/v1/jobs/{job_id}"]["get"]["operationId"] == "get_job"
    stream = paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
    kinds = {e["properties"].get("event", {}).get("const"): e for e in stream["itemSchema"]["oneOf"]}
    assert set(kinds) == {None, "status", "delta", "end", "interrupted"}  # None: the `retry: 5000` line
    assert kinds["status"]["properties"]["data"]["contentSchema"] == {"$ref": "#/components/schemas/JobStatus"}
    events = paths["/v1/jobs/{job_id}/events"]["get"]
    assert {"204", "429"} <= set(events["responses"])
    assert {p["name"] for p in events["parameters"]} >= {"Last-Event-ID"}


# --- metrics ---------------------------------------------------------------------------------------


def test_metrics_carry_the_process_and_no_created_series(base: str) -> None:
    with api(base) as http:
        http.get("/v1/jobs/" + "0" * 32)
        text = httpx.get(base + "/metrics").text
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert "varco_gateway_requests_total" in names
    assert not [n for n in names if n.endswith("_created")]  # they reached Prometheus as timestamp gauges
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds"} <= names
