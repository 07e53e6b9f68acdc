"""The HTTP gateway over real HTTP: `varco gateway` (uvicorn) -> Redis -> `varco worker` -> S3 results."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import GATEWAY_KEYS, LONG, MEDIUM, running_gateway, wait_for_state
from helpers import VARCO_CLI, ServedFiles
from PIL import Image

from varco.producer import Client, InvalidRequest
from varco.workers.devtools.local_redis import free_port

ALICE, BOB = GATEWAY_KEYS
pytest.importorskip("fastapi")


def api(base: str, key: str | None = ALICE) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=120)


def problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body = response.json()
    assert body["status"] == status and body["type"].startswith("urn:varco:problem:") and body["title"]
    return body


def job_records(client: Client) -> int:
    return sum(1 for _ in client.redis.scan_iter("varco:job:*"))


@pytest.fixture(scope="module")
def images(http_files: ServedFiles) -> dict[str, str]:
    served = {"long": http_files.add("/gw-long.png", LONG), "medium": http_files.add("/gw-medium.png", MEDIUM)}
    return {"cat": http_files.base + "/cat.png", "text": http_files.base + "/not-an-image.txt", **served}


def test_submit_status_result_overlay_and_cancel_after_finish(
    gateway: str, gateway_env: dict[str, str], images: dict[str, str]
) -> None:
    with api(gateway) as http:
        submitted = http.post(
            "/v1/jobs", json={"image_uri": images["cat"], "task": "grounding", "max_new_tokens": 1024}
        )
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["job_id"]
        assert submitted.headers["location"] == submitted.json()["status_url"] == f"/v1/jobs/{job_id}"
        assert http.get(f"/v1/jobs/{job_id}").json()["state"] in {"queued", "started", "succeeded"}

        result = http.get(f"/v1/jobs/{job_id}/result", params={"wait": 60})
        assert result.status_code == 200, result.text
        assert result.json()["job_id"] == job_id and result.json()["image"]["width"] == 640
        assert result.json()["output"]["objects"][0]["label"] == "two cats"
        assert result.json()["output"]["objects"][0]["boxes_px"] == [[9, 51, 326, 478], [326, 26, 637, 378]]
        status = http.get(f"/v1/jobs/{job_id}").json()
        assert status["state"] == "succeeded" and status["result_uri"] == f"/v1/jobs/{job_id}/result"
        # Gateway URLs, never the store's: the kept image is served by the gateway too.
        kept = http.get(result.json()["image"]["kept_uri"])
        assert kept.status_code == 200 and Image.open(io.BytesIO(kept.content)).size == (640, 480)
        assert result.json()["model"] == Path(gateway_env["VARCO_MODEL"]).name  # a local directory: its name
        assert "owner" not in status

        overlay = http.get(f"/v1/jobs/{job_id}/overlay.png")
        assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(overlay.content)).convert("RGB").size == (640, 480)  # decodes it all

        late = problem(http.delete(f"/v1/jobs/{job_id}"), 409)
        assert late["state"] == "succeeded"


def test_overlay_of_ocr_and_referring_jobs(gateway: str, images: dict[str, str]) -> None:
    jobs = [
        {"image_uri": images["cat"], "task": "ocr", "max_new_tokens": 1024},
        {"image_uri": images["cat"], "task": "referring", "region": [0.039, 0.138, 0.283, 0.257], "label": "이 물건"},
    ]
    with api(gateway) as http:
        for job_id in http.post("/v1/jobs/batch", json={"jobs": jobs}).json()["job_ids"]:
            assert http.get(f"/v1/jobs/{job_id}/result", params={"wait": 60}).status_code == 200
            overlay = http.get(f"/v1/jobs/{job_id}/overlay.png")
            assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(overlay.content)).convert("RGB").size == (640, 480)  # decodes it all


def test_batch_is_enqueued_in_order(gateway: str, images: dict[str, str]) -> None:
    jobs = [
        {"image_uri": images["cat"], "task": "caption"},
        {"image_uri": images["cat"], "task": "ocr", "max_new_tokens": 1024},
        {"image_uri": images["cat"], "task": "vqa", "prompt": "What colour is it?"},
    ]
    with api(gateway) as http:
        response = http.post("/v1/jobs/batch", json={"jobs": jobs})
        assert response.status_code == 202, response.text
        ids = response.json()["job_ids"]
        assert response.json()["status_urls"] == [f"/v1/jobs/{j}" for j in ids]
        assert [http.get(f"/v1/jobs/{j}").json()["task"] for j in ids] == ["caption", "ocr", "vqa"]
        assert len(http.get(f"/v1/jobs/{ids[1]}/result", params={"wait": 60}).json()["output"]["ocr"]) == 16


def test_bad_requests_are_problems_with_invalid_requests_message_and_enqueue_nothing(
    gateway: str, client: Client, images: dict[str, str]
) -> None:
    before = job_records(client)
    bad_region = {"image_uri": images["cat"], "task": "referring", "region": [0.5, 0.1, 0.2, 0.9]}
    with pytest.raises(InvalidRequest) as expected:
        client.validate(**bad_region)
    with api(gateway) as http:
        body = problem(http.post("/v1/jobs", json=bad_region), 422)
        assert body["detail"] == str(expected.value) and body["field"] == "region"
        assert (
            problem(http.post("/v1/jobs", json={"image_uri": "ftp://x/a.png", "task": "ocr"}), 422)["field"]
            == "image_uri"
        )
        assert problem(http.post("/v1/jobs", json={"image_uri": images["cat"], "task": "vqa"}), 422)["detail"] == (
            "invalid job request: task 'vqa' needs a prompt (the question to ask about the image)"
        )
        assert problem(http.post("/v1/jobs", json={**bad_region, "colour": 1}), 422)["field"] == "colour"
        assert problem(http.post("/v1/jobs", content=b"{not json"), 422)["type"] == "urn:varco:problem:invalid-json"
        assert problem(http.post("/v1/jobs", json=[1]), 422)["detail"].endswith("expected a JSON object")

        good = {"image_uri": images["cat"], "task": "caption"}
        batch = problem(http.post("/v1/jobs/batch", json={"jobs": [good, bad_region, good]}), 422)
        assert (batch["index"], batch["field"]) == (1, "region") and batch["detail"].startswith("request #1: ")
        too_many = problem(http.post("/v1/jobs/batch", json={"jobs": [good] * 101}), 422)
        assert too_many["field"] == "jobs" and "limit is 100" in too_many["detail"]
        big = {"image_uri": images["cat"], "task": "caption", "metadata": {"x": "a" * (2 * 1024 * 1024)}}
        assert problem(http.post("/v1/jobs", json=big), 413)["type"] == "urn:varco:problem:body-too-large"
        chunks = (b"a" * 65536 for _ in range(40))  # no Content-Length: the cap applies while it streams in
        assert problem(http.post("/v1/jobs", content=chunks), 413)["type"] == "urn:varco:problem:body-too-large"
        assert problem(http.get("/v1/jobs/abc/result", params={"wait": 61}), 422)["field"] == "wait"
    assert job_records(client) == before


def test_auth_missing_wrong_and_another_keys_job(gateway: str, images: dict[str, str], client: Client) -> None:
    with api(gateway, None) as anonymous:
        missing = anonymous.post("/v1/jobs", json={"image_uri": images["cat"], "task": "caption"})
        assert problem(missing, 401) and missing.headers["www-authenticate"].startswith("Bearer")
    with api(gateway, "not-a-key") as stranger:
        problem(stranger.get("/v1/jobs/0123"), 401)
    with api(gateway, ALICE) as alice, api(gateway, BOB) as bob:
        job_id = alice.post("/v1/jobs", json={"image_uri": images["long"], "task": "caption"}).json()["job_id"]
        unknown_id = "f" * 32
        for method, path in [("GET", ""), ("GET", "/result"), ("GET", "/events"), ("GET", "/overlay.png"),
                             ("DELETE", "")]:  # fmt: skip
            theirs = problem(bob.request(method, f"/v1/jobs/{job_id}{path}"), 404)
            unknown = problem(bob.request(method, f"/v1/jobs/{unknown_id}{path}"), 404)
            assert theirs == {**unknown, "detail": unknown["detail"].replace(unknown_id, job_id)}
        assert alice.get(f"/v1/jobs/{job_id}").json()["state"] in {"queued", "started"}  # Bob's cancel did nothing
        assert client.statuses.record(job_id)["owner"] not in (ALICE, BOB)  # a key id, never the key
        assert alice.delete(f"/v1/jobs/{job_id}").status_code == 200


def test_idempotency_key_per_api_key(gateway: str, images: dict[str, str], client: Client) -> None:
    body = {"image_uri": images["cat"], "task": "caption"}
    headers = {"Idempotency-Key": "order-81"}
    before = job_records(client)
    with api(gateway, ALICE) as alice, api(gateway, BOB) as bob:
        first = alice.post("/v1/jobs", json=body, headers=headers).json()["job_id"]
        again = alice.post("/v1/jobs", json=body, headers=headers).json()["job_id"]
        other = bob.post("/v1/jobs", json=body, headers=headers).json()["job_id"]
        assert alice.get(f"/v1/jobs/{first}").status_code == bob.get(f"/v1/jobs/{other}").status_code == 200
        problem(bob.get(f"/v1/jobs/{first}"), 404)
    assert first == again != other
    assert job_records(client) == before + 2


def test_rate_limit_per_key(gateway_env: dict[str, str], tmp_path) -> None:
    env = {**gateway_env, "VARCO_RATE_LIMIT": "0.01"}  # one request per 100 s: the second is always over
    with running_gateway(env, tmp_path / "gateway.log") as base, api(base, ALICE) as alice, api(base, BOB) as bob:
        problem(alice.get("/v1/jobs/" + "e" * 32), 404)
        over = alice.get("/v1/jobs/" + "e" * 32)
        assert "VARCO_RATE_LIMIT" in problem(over, 429)["detail"] and 1 <= int(over.headers["retry-after"]) <= 100
        problem(bob.get("/v1/jobs/" + "e" * 32), 404)  # Bob has his own bucket
        assert alice.get("/livez").status_code == 200  # health is not rate limited


def sse_states(http: httpx.Client, job_id: str) -> Iterator[dict]:
    """Each `status` event's data until the server ends the stream."""
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        event, data = None, None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
            elif line == "" and event == "status" and data is not None:
                yield json.loads(data)
                event, data = None, None


def test_events_stream_every_change_until_the_job_ends(gateway: str, images: dict[str, str]) -> None:
    with api(gateway) as http:
        job_id = http.post(
            "/v1/jobs", json={"image_uri": images["medium"], "task": "caption", "max_new_tokens": 1500}
        ).json()["job_id"]
        states = [s["state"] for s in sse_states(http, job_id)]
        assert states[-1] == "succeeded" and states[0] in {"queued", "started"}, states
        assert states == sorted(set(states), key=states.index), states  # no state twice
        assert [s["state"] for s in sse_states(http, job_id)] == ["succeeded"]  # a late subscriber: state, then end


def test_result_wait_cancel_and_failed_jobs(gateway: str, images: dict[str, str], client: Client) -> None:
    with api(gateway) as http:
        job_id = http.post(
            "/v1/jobs", json={"image_uri": images["long"], "task": "caption", "max_new_tokens": 6000}
        ).json()["job_id"]
        wait_for_state(client, job_id, {"started"})
        assert problem(http.get(f"/v1/jobs/{job_id}/result", params={"wait": 0.5}), 409)["state"] == "started"
        problem(http.get(f"/v1/jobs/{job_id}/overlay.png"), 409)
        cancelled = http.delete(f"/v1/jobs/{job_id}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] in {"started", "cancelled"}
        assert problem(http.get(f"/v1/jobs/{job_id}/result", params={"wait": 60}), 409)["type"].endswith(
            "job-cancelled"
        )
        problem(http.delete(f"/v1/jobs/{job_id}"), 409)

        failed = http.post("/v1/jobs", json={"image_uri": images["text"], "task": "caption"}).json()["job_id"]
        body = problem(http.get(f"/v1/jobs/{failed}/result", params={"wait": 60}), 409)
        assert body["type"].endswith("job-failed") and body["error"]["type"] == "ImageDecodeError"
        assert problem(http.get(f"/v1/jobs/{failed}/overlay.png"), 409)["type"].endswith("job-failed")
        problem(http.get(f"/v1/jobs/{'0' * 32}/result"), 404)


def test_page_token_is_scoped_to_one_job_and_to_reading(gateway: str, images: dict[str, str]) -> None:
    with api(gateway) as http:
        first, second = http.post(
            "/v1/jobs/batch", json={"jobs": [{"image_uri": images["cat"], "task": "caption"}] * 2}
        ).json()["job_ids"]
        redirect = httpx.get(f"{gateway}/ui/jobs/{first}", params={"key": ALICE})
        assert redirect.status_code == 303 and ALICE not in redirect.headers["location"]
        token = httpx.URL(redirect.headers["location"]).params["token"]
        page = httpx.get(f"{gateway}/ui/jobs/{first}", params={"token": token})
        assert page.status_code == 200 and "script-src 'nonce-" in page.headers["content-security-policy"]
        assert httpx.get(f"{gateway}/v1/jobs/{first}", params={"token": token}).status_code == 200
        problem(httpx.get(f"{gateway}/v1/jobs/{second}", params={"token": token}), 401)
        problem(httpx.delete(f"{gateway}/v1/jobs/{first}", params={"token": token}), 401)
        problem(httpx.get(f"{gateway}/ui/jobs/{first}", params={"key": BOB}), 404)


def test_health_docs_and_metrics(gateway: str) -> None:
    assert httpx.get(gateway + "/livez").json() == {"status": "ok", "reasons": []}
    assert httpx.get(gateway + "/readyz").json() == {"status": "ok", "reasons": []}
    assert "swagger-ui" in httpx.get(gateway + "/docs").text
    paths = httpx.get(gateway + "/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/batch", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/jobs/{job_id}/events",
            "/v1/jobs/{job_id}/overlay.png", "/ui/jobs/{job_id}"} <= set(paths)  # fmt: skip
    metrics = httpx.get(gateway + "/metrics").text
    assert 'varco_gateway_requests_total{method="GET",route="/openapi.json",status="200"}' in metrics


def test_gateway_refuses_to_start_without_keys(worker_env: dict[str, str]) -> None:
    env = {k: v for k, v in {**os.environ, **worker_env}.items() if not k.startswith("VARCO_API_KEYS")}
    result = subprocess.run([*VARCO_CLI, "gateway", "--port", "1"], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2 and "--no-auth" in result.stderr and "Traceback" not in result.stderr


def test_a_body_that_never_arrives_gets_408(gateway_env: dict[str, str], tmp_path) -> None:
    env = {**gateway_env, "VARCO_GATEWAY_BODY_TIMEOUT_S": "1"}
    with running_gateway(env, tmp_path / "gateway.log") as base:
        port = httpx.URL(base).port
        with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:  # a client that stalls mid-body
            conn.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"image")  # fmt: skip
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"application/problem+json" in head, reply
    assert json.loads(body)["type"] == "urn:varco:problem:body-timeout"


def test_redis_down_is_a_503_problem_not_a_crash(gateway_env: dict[str, str], tmp_path) -> None:
    env = {**gateway_env, "VARCO_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "VARCO_REDIS_TIMEOUT_S": "1"}
    with running_gateway(env, tmp_path / "gateway.log") as base, api(base) as http:
        assert http.get("/readyz").status_code == 503
        body = problem(http.post("/v1/jobs", json={"image_uri": "https://example.com/a.png", "task": "caption"}), 503)
        assert body["type"].endswith("broker-unavailable")
        assert problem(http.get(f"/v1/jobs/{'a' * 32}"), 503)["type"].endswith("broker-unavailable")


def test_access_log_never_holds_a_key_or_token(gateway_env: dict[str, str], tmp_path) -> None:
    log = tmp_path / "gateway.log"
    with running_gateway(gateway_env, log) as base:
        redirect = httpx.get(f"{base}/ui/jobs/{'a' * 32}", params={"key": ALICE})
        assert redirect.status_code == 404  # unknown job: the key was checked and logged redacted
        problem(httpx.get(f"{base}/v1/jobs/{'a' * 32}", params={"token": "secret-token-value"}), 401)
        # Percent-encoded names: Starlette reads them as key and token, and the log keeps the raw query.
        assert httpx.get(f"{base}/ui/jobs/{'a' * 32}?%6Bey={ALICE}").status_code == 404
        problem(httpx.get(f"{base}/v1/jobs/{'a' * 32}?%74oken=secret-token-value"), 401)
    text = log.read_text()
    assert "/ui/jobs/" in text and "key=[redacted]" in text and "token=[redacted]" in text, text
    assert "%6Bey=[redacted]" in text and "%74oken=[redacted]" in text, text
    assert ALICE not in text and "secret-token-value" not in text
