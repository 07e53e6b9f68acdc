"""The gateway against hostile input: parse errors are 4xx problems, 5xx are counted, page tokens have one
spelling, a body has one deadline, failed logins and the job page are rate limited, a half-done batch
says what it enqueued.

The app runs in this process under Starlette's TestClient, over a real redis-server; no worker.
tests/integration/test_gateway_limits.py covers what needs a real `varco gateway` (headers, sockets).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from varco.gateway.app import create_app
from varco.gateway.auth import KeyRing, key_id
from varco.gateway.limits import BodyLimits
from varco.gateway.problems import Problem
from varco.gateway.ratelimit import RateLimiter
from varco.producer import Client
from varco.tasks.connections import BrokerUnavailable
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import start_redis

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
JOB = {"image_uri": "https://images.example/cat.png", "task": "caption"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A private redis-server's and a results directory's."""
    with start_redis(tmp_path_factory.mktemp("redis-hardening")) as redis_server:
        yield Settings(broker_url=redis_server.url, result_store=tmp_path_factory.mktemp("results").as_uri() + "/")


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


def gateway(settings: Settings, client: Client, **changes: Any) -> TestClient:
    """The app with `changes` to its settings; a 500 comes back as a response, not as the exception."""
    app = create_app(settings.model_copy(update=changes), [ALICE, BOB], client=client)
    return TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {ALICE}"})


def problem(response: Any, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"urn:varco:problem:{kind}", body
    return body


def requests_total(http: TestClient) -> dict[tuple[str, str, str], float]:
    families = text_string_to_metric_families(http.get("/metrics").text)
    return {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for f in families
        for s in f.samples
        if s.name == "varco_gateway_requests_total"
    }


# --- parse errors are 4xx, and a 5xx is counted --------------------------------------------------


@pytest.mark.parametrize("field", ["image_uri", "prompt", "callback_url", "idempotency_key"])
def test_a_lone_surrogate_escape_is_a_422_naming_its_field(settings: Settings, client: Client, field: str) -> None:
    """JSON's \\ud800 escape decodes to a lone surrogate, which no broker message can carry (found by fuzzing)."""
    body = {"image_uri": "https://e.example/a.png", "task": "vqa", "prompt": "what?",
            "callback_url": "https://e.example/hook", "idempotency_key": "k"}  # fmt: skip
    body[field] += "\ud800"
    raw = json.dumps(body).encode()  # ensure_ascii writes the surrogate as the escape a client sends
    assert b"\\ud800" in raw
    with gateway(settings, client) as http:
        answer = problem(http.post("/v1/jobs", content=raw, headers={"content-type": "application/json"}), 422,
                         "invalid-request")  # fmt: skip
    assert answer["field"] == field


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/batch"])
def test_json_nested_past_the_parsers_recursion_is_a_422(settings: Settings, client: Client, path: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with gateway(settings, client) as http:
        answer = problem(http.post(path, content=deep), 422, "invalid-json")
    assert answer["detail"] == "request body is nested too deeply to parse"


def test_an_unexpected_error_is_a_500_counted_in_the_metrics(
    settings: Settings, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> list[str]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(client, "submit_many", broken)
    with gateway(settings, client) as http:
        assert http.post("/v1/jobs", json=JOB).status_code == 500
        assert http.post("/v1/jobs", json=JOB).status_code == 500
        assert requests_total(http)[("POST", "/v1/jobs", "500")] == 2


def test_a_batch_cut_off_by_redis_says_which_jobs_were_enqueued(
    settings: Settings, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = ["a" * 32, "b" * 32]

    def half_way(*args: Any, **kwargs: Any) -> list[str]:
        raise BrokerUnavailable("Redis stopped answering (2 of 3 enqueued)", done)

    monkeypatch.setattr(client, "submit_many", half_way)
    with gateway(settings, client) as http:
        answer = http.post("/v1/jobs/batch", json={"jobs": [JOB, JOB, JOB]})
    body = problem(answer, 503, "broker-unavailable")
    assert body["enqueued"] == done and answer.headers["retry-after"] == "5"


# --- page tokens have one spelling ---------------------------------------------------------------


def _respelled(token: str) -> list[str]:
    kid, expires, signature = token.split(".")
    arabic_indic = expires.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    return [
        f"{kid}.{expires}.{signature[:-1]}é",  # a non-ASCII signature (compare_digest raised TypeError)
        f"{kid}.{expires[:-1]}².{signature}",  # "²".isdigit() is true, int("²") raises
        f"{kid}.{arabic_indic}.{signature}",  # int() reads it as the same expiry: the signature matched
        f"{kid}.0{expires}.{signature}",  # a leading zero: the same number again
        f"{kid}.{expires}.{signature}=",  # padding
        f"{kid}.{expires}.{signature}\n",
        f"{kid.upper()}.{expires}.{signature}",
    ]


def test_only_the_exact_page_token_verifies() -> None:
    ring = KeyRing([ALICE])
    token = ring.page_token(key_id(ALICE), "j" * 32, now=1_000.0)
    assert ring.verify_page_token(token, "j" * 32, now=1_001.0) == key_id(ALICE)
    for other in _respelled(token):
        assert ring.verify_page_token(other, "j" * 32, now=1_001.0) is None, other


def test_a_respelled_page_token_is_a_401_on_every_route_that_takes_one(settings: Settings, client: Client) -> None:
    with gateway(settings, client) as http:
        job_id = http.post("/v1/jobs", json=JOB).json()["job_id"]
        token = KeyRing([ALICE]).page_token(key_id(ALICE), job_id)
        assert http.get(f"/v1/jobs/{job_id}", params={"token": token}, headers={"Authorization": ""}).is_success
        for other in _respelled(token):
            for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/ui/jobs/{job_id}"):
                answer = http.get(path, params={"token": other}, headers={"Authorization": ""})
                problem(answer, 401, "unauthorized")
        assert not [k for k in requests_total(http) if k[2].startswith("5")]


# --- one deadline for a body ---------------------------------------------------------------------


def test_a_body_trickled_in_chunks_each_within_the_timeout_still_meets_one_deadline() -> None:
    # Each chunk comes 0.3 s after the last, within the 0.5 s timeout; the whole body would take 1.5 s.
    chunks = [{"type": "http.request", "body": b"x", "more_body": i < 4} for i in range(5)]

    async def trickle() -> dict[str, Any]:
        await asyncio.sleep(0.3)
        return chunks.pop(0)

    async def reads_the_body(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass

    async def unused_send(message: Any) -> None:
        raise AssertionError("no response expected from the app")

    limits = BodyLimits(reads_the_body, max_bytes=1024, read_timeout_s=0.5)
    with pytest.raises(Problem) as late:
        asyncio.run(limits({"type": "http", "headers": []}, trickle, unused_send))
    assert late.value.status == 408 and len(chunks) >= 3  # cut off after the first chunk or two


def test_the_job_pages_link_opens_with_the_bearer_header_still_set(settings: Settings, client: Client) -> None:
    """A client that keeps its Authorization header on redirects (curl -L, fetch) gets the page, not a loop."""
    with gateway(settings, client) as http:
        job_id = http.post("/v1/jobs", json=JOB).json()["job_id"]
        link = http.get(f"/ui/jobs/{job_id}", follow_redirects=False)
        assert link.status_code == 303
        page = http.get(link.headers["location"], follow_redirects=False)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        # A stale token beside a valid key is exchanged again, once.
        stale = http.get(f"/ui/jobs/{job_id}", params={"token": "k1.1.AAAA"}, follow_redirects=False)
        assert stale.status_code == 303 and "token=" in stale.headers["location"]


# --- the rate limit: the job page, failed logins -------------------------------------------------

SLOW = 0.001  # a bucket of one, refilled once in 1000 s


def test_the_job_page_is_rate_limited_per_key(settings: Settings, client: Client) -> None:
    with gateway(settings, client, rate_limit=SLOW) as http:
        job_id = http.post("/v1/jobs", json=JOB).json()["job_id"]  # Alice's one token
        page = http.get(f"/ui/jobs/{job_id}", params={"key": ALICE}, headers={"Authorization": ""},
                        follow_redirects=False)  # fmt: skip
        problem(page, 429, "rate-limited")
        bearer = http.get(f"/ui/jobs/{job_id}", follow_redirects=False)
        problem(bearer, 429, "rate-limited")


def test_failed_authentication_is_rate_limited_per_client_address(settings: Settings, client: Client) -> None:
    with gateway(settings, client, rate_limit=SLOW) as http:
        job_id = "f" * 32
        wrong = {"Authorization": "Bearer not-a-key"}
        first = problem(http.get(f"/v1/jobs/{job_id}", headers=wrong), 401, "unauthorized")
        assert first["detail"] == "unknown API key"
        again = problem(http.post("/v1/jobs", json=JOB, headers=wrong), 429, "rate-limited")
        assert again["detail"] == f"over VARCO_RATE_LIMIT ({SLOW:g} requests/s) for this client address"
        problem(http.get(f"/ui/jobs/{job_id}", params={"key": "not-a-key"}, headers={"Authorization": ""}),
                429, "rate-limited")  # fmt: skip
        problem(http.get(f"/v1/jobs/{job_id}", headers={"Authorization": ""}), 429, "rate-limited")  # no key
        # A key's own bucket is apart from the address's: Alice still gets her one request.
        assert http.post("/v1/jobs", json=JOB).status_code == 202


def test_address_buckets_that_have_refilled_are_dropped() -> None:
    limiter = RateLimiter(1.0)
    limiter.SWEEP_ABOVE = 100
    for n in range(150):
        limiter.acquire(f"address:10.0.{n // 256}.{n % 256}", now=0.0)
    limiter.acquire("address:10.9.9.9", now=0.5)  # within a second: none is full yet
    assert len(limiter) == 151
    assert limiter.acquire("address:10.9.9.9", now=1.5) == 0.0  # a full bucket again, as a new one is
    assert len(limiter) == 1
