"""Open event streams end with an event of their own and a whole chunked body when the gateway stops or
loses Redis, never cut off mid-transfer (issue 20, item 6). A real `varco gateway` process and a private
redis-server; no worker: the tests move the jobs on as a worker would.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import GATEWAY_KEYS, gateway_process

from varco.gateway.openai_mapping import SERVED_ALIAS
from varco.producer import Client
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import LocalRedis, start_redis

AUTH = {"Authorization": f"Bearer {GATEWAY_KEYS[0]}"}
JOB = {"image_uri": "https://images.example/cat.png", "task": "caption"}
CHAT = {
    "model": SERVED_ALIAS, "stream": True, "max_tokens": 16,
    "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                              {"type": "image_url", "image_url": {"url": JOB["image_uri"]}}]}],
}  # fmt: skip


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    with start_redis(tmp_path) as server:
        yield server


@pytest.fixture
def env(redis_server: LocalRedis, tmp_path: Path) -> dict[str, str]:
    return {
        "VARCO_BROKER_URL": redis_server.url,
        "VARCO_RESULT_STORE": (tmp_path / "results").as_uri() + "/",
        "VARCO_API_KEYS": ",".join(GATEWAY_KEYS),
        "VARCO_REDIS_TIMEOUT_S": "1",  # a frozen Redis fails each call after 1 s
        "VARCO_GATEWAY_STREAM_OUTAGE_S": "1",  # and a stream gives it up after 1 s more (60 by default)
    }


def read_in_background(method: str, url: str, **kwargs: Any) -> Future[tuple[int, str, str | None]]:
    """The whole response on a thread: its status, its body, and the transfer's error (None: it ended whole)."""
    done: Future[tuple[int, str, str | None]] = Future()

    def read() -> None:
        status, body = 0, b""
        try:
            with httpx.stream(method, url, headers=AUTH, timeout=60, **kwargs) as response:
                status = response.status_code
                for chunk in response.iter_raw():
                    body += chunk
            done.set_result((status, body.decode(), None))
        except httpx.HTTPError as exc:  # an incomplete chunked read, a closed connection
            done.set_result((status, body.decode(), f"{type(exc).__name__}: {exc}"))

    threading.Thread(target=read, daemon=True).start()
    return done


def until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def last_event(body: str) -> tuple[str, dict[str, Any]]:
    """The kind (`event:` line) and JSON data of the body's last event."""
    frame = [f for f in body.split("\n\n") if f.strip()][-1]
    lines = dict(line.split(": ", 1) for line in frame.splitlines())
    return lines.get("event", "message"), json.loads(lines["data"])


def test_sigterm_ends_open_streams_each_with_its_last_event_and_the_gateway_exits(
    env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "gateway.log"
    with gateway_process(env, log) as (base, process), Client(Settings(broker_url=env["VARCO_BROKER_URL"])) as client:
        chat = read_in_background("POST", f"{base}/v1/chat/completions", json=CHAT)
        until(lambda: any(client.redis.scan_iter("varco:job:*")), "the chat completion's job was never submitted")
        [chat_job] = [k.removeprefix("varco:job:") for k in client.redis.scan_iter("varco:job:*")]
        client.statuses.begin_attempt(chat_job, "gpu0@test", max_attempts=3)
        client.deltas.append(chat_job, "The")  # the chat stream's response begins with its first text
        job_id = httpx.post(f"{base}/v1/jobs", json=JOB, headers=AUTH).json()["job_id"]
        events = read_in_background("GET", f"{base}/v1/jobs/{job_id}/events")
        until(lambda: client.statuses.record(job_id) is not None and not chat.done(), "the streams never opened")
        time.sleep(0.5)  # both responses are under way (nothing here depends on how long they take)
        process.send_signal(signal.SIGTERM)
        status, body, error = events.result(timeout=60)
        chat_status, chat_body, chat_error = chat.result(timeout=60)
        process.wait(timeout=60)
        assert (status, error) == (200, None), body  # a whole chunked body, not curl's exit 18
        assert body.startswith("retry: 5000\n\n") and "event: status" in body
        assert last_event(body) == ("interrupted", {"reason": "shutdown", "detail": "the gateway is shutting down"})
        assert (chat_status, chat_error) == (200, None), chat_body
        assert "chat.completion.chunk" in chat_body and "[DONE]" not in chat_body
        kind, error_body = last_event(chat_body)
        assert kind == "message" and error_body["error"]["code"] == "gateway_shutdown", chat_body
        until(lambda: client.statuses.cancel_requested(chat_job), "the interrupted chat completion's job runs on")
    text = log.read_text()
    assert "Application shutdown complete" in text  # an orderly exit (uvicorn then re-raises the SIGTERM)
    assert "timeout graceful shutdown exceeded" not in text  # no request was left to be cut off


@pytest.mark.parametrize("how", ["frozen", "killed"])
def test_a_stream_that_loses_redis_ends_with_broker_unavailable(
    how: str, env: dict[str, str], redis_server: LocalRedis, tmp_path: Path
) -> None:
    with gateway_process(env, tmp_path / "gateway.log") as (base, _):
        job_id = httpx.post(f"{base}/v1/jobs", json=JOB, headers=AUTH).json()["job_id"]
        events = read_in_background("GET", f"{base}/v1/jobs/{job_id}/events")
        time.sleep(1)  # the stream is open, waiting for the job's next change
        if how == "frozen":
            redis_server.process.send_signal(signal.SIGSTOP)  # the kernel still accepts; nothing answers
        else:
            redis_server.kill()
        try:
            status, body, error = events.result(timeout=60)
        finally:
            if how == "frozen":
                redis_server.process.send_signal(signal.SIGCONT)
    assert (status, error) == (200, None), body
    kind, data = last_event(body)
    assert kind == "interrupted" and data["reason"] == "broker-unavailable", body
