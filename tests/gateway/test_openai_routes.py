"""The OpenAI routes in this process, through the official `openai` SDK: models, errors, waiting, disconnects.

As in test_gateway_routes.py: a real uvicorn server (a thread) over a real redis-server, with no
worker; the test moves jobs on the way a worker would (status transitions, a result file).
tests/integration/test_openai_api.py runs the whole pipeline with a real worker.
"""

from __future__ import annotations

import json
import queue
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
import openai
from test_gateway_routes import ALICE, BOB, IMAGE, enqueued, finish, serve

from varco.gateway.auth import key_id
from varco.gateway.openai_mapping import SERVED_ALIAS
from varco.producer import Client
from varco.tasks.results_store import FileResultStore
from varco.tasks.schemas import ErrorInfo, JobState
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import free_port, start_redis

MODEL = "NCSOFT/VARCO-VISION-14B-HF"  # VARCO_MODEL's default: the settings these tests serve
CHAT: dict[str, Any] = {
    "model": SERVED_ALIAS,
    "messages": [{"role": "user", "content": [{"type": "text", "text": "<gro>\nDescribe the image in detail."},
                                              {"type": "image_url", "image_url": {"url": IMAGE}}]}],
    "max_tokens": 64,
}  # fmt: skip
RAW = "The image shows <obj>a cat</obj><bbox>0.1, 0.2, 0.5, 0.6</bbox>."


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with start_redis(tmp_path_factory.mktemp("redis-openai")) as redis_server:
        yield Settings(broker_url=redis_server.url, result_store=tmp_path_factory.mktemp("results").as_uri() + "/")


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


@pytest.fixture
def base(settings: Settings, client: Client) -> Iterator[str]:
    with serve(settings, [ALICE, BOB], client) as url:
        yield url


@pytest.fixture(autouse=True)
def clean(client: Client) -> None:
    client.redis.flushdb()


def sdk(base: str, key: str = ALICE) -> Any:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30)


def records(client: Client) -> list[str]:
    return [k.removeprefix("varco:job:") for k in client.redis.scan_iter("varco:job:*")]


def settled(client: Client) -> bool:
    """A job is in the fair queue and its ticket on the broker: the submit, which runs in the background
    here, inserts the job first and publishes its ticket a moment later."""
    try:
        return bool(enqueued(client))
    except AssertionError:  # the ticket is not published yet
        return False


def await_job(client: Client) -> str:
    """The id of the job a chat completion submitted, once it is on the queue (its record is made first)."""
    until(lambda: settled(client), "no job was enqueued")
    [job_id] = records(client)
    return job_id


def until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def in_background(call: Callable[[], Any]) -> Future[Any]:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def succeed(client: Client, settings: Settings, job_id: str, finish_reason: str = "stop") -> None:
    result = {
        "job_id": job_id, "task": "grounding", "state": "succeeded", "model": MODEL, "prompt": "p",
        "image": {"uri": IMAGE, "width": 200, "height": 100, "sha256": "0" * 64},
        "output": {"raw": RAW, "text": "The image shows a cat.",
                   "objects": [{"label": "a cat", "span": [16, 21], "boxes": [[0.1, 0.2, 0.5, 0.6]],
                                "boxes_px": [[20, 20, 100, 60]]}]},
        "usage": {"prompt_tokens": 900, "output_tokens": 21}, "finish_reason": finish_reason,
        "finished_at": "2026-12-05T08:00:00+00:00",
    }  # fmt: skip
    uri = FileResultStore(settings.result_store).write(job_id, json.dumps(result).encode())
    finish(client, job_id, JobState.SUCCEEDED, result_uri=uri)


def test_models_list_and_retrieve(base: str) -> None:
    with sdk(base) as api:
        models = api.models.list()
        assert [m.id for m in models.data] == [MODEL, SERVED_ALIAS]
        assert {m.object for m in models.data} == {"model"}
        assert api.models.retrieve(SERVED_ALIAS).id == SERVED_ALIAS
        with pytest.raises(openai.NotFoundError) as missing:
            api.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"


def test_a_completion_waits_for_its_job_and_answers_with_the_tags_usage_and_varco(
    base: str, client: Client, settings: Settings
) -> None:
    with sdk(base) as api:
        pending = in_background(lambda: api.chat.completions.with_raw_response.create(**CHAT))
        job_id = await_job(client)
        [request] = enqueued(client)
        assert request["task"] == "grounding" and request["max_new_tokens"] == 64 and request["image_uri"] == IMAGE
        assert client.statuses.record(job_id)["owner"] == key_id(ALICE)  # a job like any: /v1/jobs sees it
        assert client.statuses.record(job_id)["tenant"] == key_id(ALICE)  # a nameless key is its own tenant
        assert not pending.done()
        succeed(client, settings, job_id, finish_reason="length")
        raw = pending.result(timeout=30)
    completion = raw.parse()
    assert raw.headers["x-request-id"] == job_id and completion.id == f"chatcmpl-{job_id}"
    assert completion.model == MODEL and completion.object == "chat.completion"
    assert completion.choices[0].message.content == RAW and completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.total_tokens == 921
    assert completion.varco["job_id"] == job_id
    assert completion.varco["output"]["objects"][0]["boxes_px"] == [[20, 20, 100, 60]]


@pytest.mark.parametrize(
    ("error", "exception", "code", "param"),
    [
        (ErrorInfo(type="ImageDecodeError", message="not an image"), "BadRequestError", "invalid_image",
         "messages[0].content[1].image_url.url"),
        (ErrorInfo(type="ImageFetchError", message="404 from origin"), "BadRequestError", "invalid_image",
         "messages[0].content[1].image_url.url"),
        (ErrorInfo(type="InferenceError", message="CUDA error"), "InternalServerError", "InferenceError", None),
        (None, "InternalServerError", "job_failed", None),
    ],
)  # fmt: skip
def test_a_failed_job_is_an_openai_error(
    base: str, client: Client, error: ErrorInfo | None, exception: str, code: str, param: str | None
) -> None:
    with sdk(base) as api:
        pending = in_background(lambda: api.chat.completions.create(**CHAT))
        job_id = await_job(client)
        finish(client, job_id, JobState.FAILED, **({"error": error} if error else {}))
        with pytest.raises(getattr(openai, exception)) as failed:
            pending.result(timeout=30)
    assert (failed.value.code, failed.value.param) == (code, param)
    assert job_id in failed.value.message


def test_a_job_cancelled_on_v1_jobs_is_a_conflict(base: str, client: Client) -> None:
    with sdk(base) as api, httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ALICE}"}) as http:
        pending = in_background(lambda: api.chat.completions.create(**CHAT))
        job_id = await_job(client)
        assert http.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
        with pytest.raises(openai.ConflictError) as cancelled:
            pending.result(timeout=30)
    assert cancelled.value.code == "job_cancelled"


@pytest.mark.parametrize("running", [False, True])
def test_a_caller_that_hangs_up_cancels_its_job(base: str, client: Client, running: bool) -> None:
    body = json.dumps(CHAT).encode()
    port = httpx.URL(base).port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)  # fmt: skip
        job_id = await_job(client)
        if running:  # a worker took it
            client.statuses.begin_attempt(job_id, "gpu0@test", max_attempts=3)
    # The socket is closed: the gateway sees the disconnect and cancels the job (a running one: its worker is told).
    if running:
        until(lambda: client.statuses.cancel_requested(job_id), "the running job's cancel was never requested")
    else:
        until(lambda: client.status(job_id).state is JobState.CANCELLED, "the queued job was not cancelled")


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"temperature": 0.8}, "temperature", "unsupported_parameter"),
        ({"n": 3}, "n", "unsupported_parameter"),
        ({"max_tokens": 100000}, "max_tokens", "invalid_value"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://h/a.png"}}]}]},
         "messages[0].content[0].image_url.url", "invalid_image_url"),
    ],
)  # fmt: skip
def test_a_bad_parameter_is_a_400_naming_it_and_enqueues_nothing(
    base: str, client: Client, change: dict[str, Any], param: str, code: str
) -> None:
    with sdk(base) as api, pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(**{**CHAT, **change})
    assert (refused.value.param, refused.value.code, refused.value.type) == (param, code, "invalid_request_error")
    assert records(client) == []


def test_an_unknown_model_is_a_404_model_not_found(base: str, client: Client) -> None:
    with sdk(base) as api, pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(**{**CHAT, "model": "gpt-4o"})
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")
    assert "'gpt-4o'" in missing.value.message and records(client) == []


def test_a_big_inline_image_is_a_400_on_its_url(base: str, client: Client, settings: Settings) -> None:
    too_big = "data:image/png;base64," + "A" * (settings.max_data_uri_bytes * 4 // 3 + 8)
    content = [{"type": "image_url", "image_url": {"url": too_big}}]
    with sdk(base) as api, pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(**{**CHAT, "messages": [{"role": "user", "content": content}]})
    assert refused.value.param == "messages[0].content[0].image_url.url" and "VARCO_MAX_DATA_URI_BYTES" in str(
        refused.value.message
    )
    assert records(client) == []


def test_auth_rate_limit_and_bad_json_answer_in_openais_shape(base: str, settings: Settings, client: Client) -> None:
    with sdk(base, "not-a-key") as stranger, pytest.raises(openai.AuthenticationError) as unknown:
        stranger.models.list()
    assert unknown.value.code == "invalid_api_key" and unknown.value.type == "invalid_request_error"
    answer = httpx.post(base + "/v1/chat/completions", content=b"{not json",
                        headers={"Authorization": f"Bearer {ALICE}"})  # fmt: skip
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    auth = {"Authorization": f"Bearer {ALICE}"}
    deep = httpx.post(base + "/v1/chat/completions", content=b"[" * 200_000, headers=auth)
    assert deep.status_code == 400 and deep.json()["error"]["message"] == "the JSON body is nested too deeply to parse"
    slow = settings.model_copy(update={"rate_limit": 0.001})  # a bucket of one, refilled once in 1000 s
    with serve(slow, [ALICE, BOB], client) as limited_base, sdk(limited_base) as api:
        api.models.list()
        with pytest.raises(openai.RateLimitError) as limited:
            api.chat.completions.create(**CHAT)
    assert limited.value.code == "rate_limit_exceeded" and int(limited.value.response.headers["retry-after"]) >= 990
    assert records(client) == []


def test_a_tenant_over_its_queued_limit_gets_a_rate_limit_error(settings: Settings, client: Client) -> None:
    limited = settings.model_copy(update={"max_queued_per_tenant": 1})
    with Client(limited) as own, serve(limited, [f"teamA:{ALICE}", BOB], own) as base:
        own.submit(IMAGE, task="caption", tenant="teamA")  # the key's name is the tenant Python names
        with sdk(base) as api, pytest.raises(openai.RateLimitError) as full:
            api.chat.completions.create(**CHAT)
    assert full.value.code == "rate_limit_exceeded" and full.value.response.headers["retry-after"] == "5"
    assert "teamA" in full.value.message and "VARCO_MAX_QUEUED_PER_TENANT" in full.value.message
    assert len(records(client)) == 1  # nothing more was enqueued


def test_a_streamed_completion_over_the_keys_stream_cap_is_a_rate_limit_error(
    settings: Settings, client: Client
) -> None:
    capped = settings.model_copy(update={"gateway_max_streams_per_key": 1})
    auth = {"Authorization": f"Bearer {ALICE}"}
    with serve(capped, [ALICE, BOB], client) as base, httpx.Client(base_url=base, headers=auth, timeout=30) as http:
        job_id = http.post("/v1/jobs", json={"image_uri": IMAGE, "task": "caption"}).json()["job_id"]
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as open_one, sdk(base) as api:
            assert open_one.status_code == 200
            with pytest.raises(openai.RateLimitError) as over:
                api.chat.completions.create(**CHAT, stream=True)
    assert over.value.code == "too_many_streams" and int(over.value.response.headers["retry-after"]) > 0
    assert "VARCO_GATEWAY_MAX_STREAMS_PER_KEY" in over.value.message
    assert records(client) == [job_id]  # the refused completion submitted nothing


def test_redis_down_is_a_503_in_openais_shape(settings: Settings, client: Client) -> None:
    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0", "redis_timeout_s": 1.0})
    with Client(down) as unreachable, serve(down, [ALICE], unreachable) as base, sdk(base) as api, \
            pytest.raises(openai.InternalServerError) as unavailable:  # fmt: skip
        api.chat.completions.create(**CHAT)
    assert unavailable.value.status_code == 503 and unavailable.value.code == "service_unavailable"


def test_a_body_over_the_limit_is_a_413_in_openais_shape(base: str, settings: Settings, client: Client) -> None:
    huge = {**CHAT, "user": "u" * (settings.gateway_max_body_bytes + 1)}
    with sdk(base) as api, pytest.raises(openai.APIStatusError) as declared:  # the SDK sends a Content-Length
        api.chat.completions.create(**huge)
    assert declared.value.status_code == 413 and declared.value.code == "request_too_large"
    body = json.dumps(huge).encode()
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))  # no Content-Length: capped as it streams
    streamed = httpx.post(base + "/v1/chat/completions", content=chunks, headers={"Authorization": f"Bearer {ALICE}"})
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"
    assert records(client) == []


def test_v1_jobs_keeps_its_problem_documents(base: str) -> None:
    answer = httpx.post(base + "/v1/jobs", content=b"{not json", headers={"Authorization": f"Bearer {ALICE}"})
    assert answer.status_code == 422 and answer.headers["content-type"] == "application/problem+json"


def test_the_api_description_lists_the_openai_routes(base: str) -> None:
    paths = httpx.get(base + "/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/models/{model}", "/v1/chat/completions"} <= set(paths)


def chunks_in_background(base: str, **params: Any) -> tuple[queue.Queue[Any], Future[Any]]:
    """A streamed completion read by the SDK in a thread: each chunk into the queue as it arrives."""
    arrived: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        with sdk(base).chat.completions.create(**CHAT, stream=True, **params) as stream:
            for chunk in stream:
                arrived.put(chunk)

    return arrived, in_background(read)


def test_a_streamed_completion_relays_each_piece_as_the_worker_publishes_it(
    base: str, client: Client, settings: Settings
) -> None:
    arrived, done = chunks_in_background(base, stream_options={"include_usage": True})
    job_id = await_job(client)
    client.statuses.begin_attempt(job_id, "gpu0@test", max_attempts=3)
    client.deltas.append(job_id, RAW[:16])
    role, first = arrived.get(timeout=30), arrived.get(timeout=30)
    assert role.choices[0].delta.role == "assistant" and role.model_extra["varco"] == {"job_id": job_id}
    assert first.choices[0].delta.content == "The image shows " and first.id == f"chatcmpl-{job_id}"
    assert client.status(job_id).state is JobState.STARTED  # a chunk came while the job was running
    client.deltas.append(job_id, RAW[16:])
    assert arrived.get(timeout=30).choices[0].delta.content == RAW[16:]
    succeed(client, settings, job_id)
    client.deltas.end(job_id, "succeeded", finish_reason="length", prompt_tokens=900, output_tokens=21)
    done.result(timeout=30)
    last, usage = arrived.get_nowait(), arrived.get_nowait()
    assert last.choices[0].finish_reason == "length" and last.choices[0].delta.content is None
    assert usage.choices == [] and (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (900, 21)
    assert arrived.empty()


def test_a_stream_whose_end_says_no_usage_takes_it_from_the_result(base: str, client: Client, settings: Settings):
    arrived, done = chunks_in_background(base)  # no include_usage: no usage chunk
    job_id = await_job(client)
    succeed(client, settings, job_id, finish_reason="stop")  # ended without its run's end entry (a lost write)
    done.result(timeout=30)
    chunks = [arrived.get_nowait() for _ in range(arrived.qsize())]
    assert [c.choices[0].finish_reason for c in chunks] == [None, "stop"]


def test_a_streamed_job_failing_before_any_text_is_an_http_error_and_after_it_an_error_event(
    base: str, client: Client
) -> None:
    _, early = chunks_in_background(base)
    job_id = await_job(client)
    finish(client, job_id, JobState.FAILED, error=ErrorInfo(type="ImageDecodeError", message="not an image"))
    with pytest.raises(openai.BadRequestError) as bad:
        early.result(timeout=30)
    assert bad.value.code == "invalid_image"
    client.redis.flushdb()
    arrived, late = chunks_in_background(base)
    job_id = await_job(client)
    client.statuses.begin_attempt(job_id, "gpu0@test", max_attempts=3)
    client.deltas.append(job_id, "The")
    assert arrived.get(timeout=30).choices[0].delta.role == "assistant"
    assert client.statuses.transition(job_id, JobState.FAILED, error=ErrorInfo(type="InferenceError", message="x"))
    with pytest.raises(openai.APIError, match="InferenceError") as failed:
        late.result(timeout=30)
    assert failed.value.code == "InferenceError"


def test_a_caller_that_hangs_up_mid_stream_cancels_its_job(base: str, client: Client) -> None:
    body = json.dumps(CHAT | {"stream": True}).encode()
    port = httpx.URL(base).port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)  # fmt: skip
        job_id = await_job(client)
        client.statuses.begin_attempt(job_id, "gpu0@test", max_attempts=3)
        client.deltas.append(job_id, "The")
        received = b""
        while b"chat.completion.chunk" not in received:  # the stream has begun (the head may come alone)
            more = conn.recv(65536)
            assert more, "the connection closed before the first chunk"
            received += more
    until(lambda: client.statuses.cancel_requested(job_id), "the running job's cancel was never requested")


def test_job_events_carry_the_text_of_a_job_submitted_with_streaming(base: str, client: Client) -> None:
    auth = {"Authorization": f"Bearer {ALICE}"}
    job_id = httpx.post(f"{base}/v1/jobs", json={"image_uri": IMAGE, "task": "ocr", "stream": True},
                        headers=auth).json()["job_id"]  # fmt: skip
    finish(client, job_id, JobState.STARTED)
    client.deltas.append(job_id, "백범")
    client.deltas.append(job_id, "로")
    client.statuses.transition(job_id, JobState.CANCELLED)

    def frames(last_event_id: str | None = None) -> list[str]:
        headers = auth | ({"Last-Event-ID": last_event_id} if last_event_id else {})
        with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=headers, timeout=30) as events:
            return [f for f in events.read().decode().split("\n\n") if f]

    whole = frames()
    kinds = [f.splitlines()[0] for f in whole]
    assert kinds == ["retry: 5000", "event: delta", "event: delta", "event: status", "event: end"]  # final after text
    assert [json.loads(f.splitlines()[2].removeprefix("data: ")) for f in whole[1:3]] == [{"text": "백범"},
                                                                                           {"text": "로"}]  # fmt: skip
    assert '"cancelled"' in whole[3]
    # Each id carries both cursors: a reconnect after the first piece of text gets the rest, and only it.
    ids = [f.splitlines()[1].removeprefix("id: ") for f in whole[1:4]]
    assert ids[0].startswith("/") and ids[1].startswith("/") and "/" in ids[2] and not ids[2].startswith("/")
    resumed = frames(ids[0])
    assert [f.splitlines()[0] for f in resumed] == ["retry: 5000", "event: delta", "event: status", "event: end"]
    assert resumed[1] == whole[2] and resumed[2] == whole[3]
    assert httpx.get(f"{base}/v1/jobs/{job_id}/events", headers=auth | {"Last-Event-ID": ids[2]}).status_code == 204


# --- tracing (issue 23): the OpenAI routes and their streams are server spans in the caller's trace ---
def test_completions_and_their_streams_are_server_spans_in_the_callers_trace(
    spans: Any, settings: Settings, client: Client
) -> None:
    trace_id, caller = "ab" * 16, "cd" * 8
    headers = {"Authorization": f"Bearer {ALICE}", "traceparent": f"00-{trace_id}-{caller}-01"}
    with serve(settings, [ALICE], client) as traced:  # made while tracing is on: instrumented
        pending = in_background(lambda: httpx.post(f"{traced}/v1/chat/completions", json=CHAT, headers=headers,
                                                   timeout=30))  # fmt: skip
        job_id = await_job(client)
        succeed(client, settings, job_id)
        assert pending.result(timeout=30).status_code == 200
        client.redis.flushdb()
        stream = in_background(lambda: httpx.post(f"{traced}/v1/chat/completions", json=CHAT | {"stream": True},
                                                  headers=headers, timeout=30))  # fmt: skip
        streamed = await_job(client)
        client.statuses.begin_attempt(streamed, "gpu0@test", max_attempts=3)
        client.deltas.append(streamed, RAW)
        time.sleep(0.2)  # (not a timing assert: the stream's first chunk goes out before the job ends)
        ended_job_ns = time.time_ns()  # the stream cannot end before this: its job has not ended yet
        succeed(client, settings, streamed)
        client.deltas.end(streamed, "succeeded", finish_reason="stop", prompt_tokens=9, output_tokens=2)
        assert b"[DONE]" in stream.result(timeout=30).content
    found = spans.get_finished_spans()
    servers = [s for s in found if s.kind.name == "SERVER"]
    assert [s.name for s in servers] == ["POST /v1/chat/completions"] * 2
    for server in servers:
        assert server.context.trace_id == int(trace_id, 16) and server.parent.span_id == int(caller, 16)
        assert server.attributes["http.route"] == "/v1/chat/completions"
        assert server.attributes["http.response.status_code"] == 200  # stable HTTP semantic conventions
        [submit] = [s for s in found if s.name == "varco.submit" and s.parent.span_id == server.context.span_id]
        assert submit.kind.name == "PRODUCER" and submit.attributes["messaging.system"] == "celery"
    assert servers[1].end_time > ended_job_ns  # the stream's span lasts as long as the stream
    assert [s.name for s in found if s.name.endswith(("http send", "http receive"))] == []  # none per SSE frame
