"""The gateway keeps an idle connection open longer than its clients reuse one: httpx (and the OpenAI SDK
built on it) reuse an idle connection for 5 s, and at uvicorn's 5 s the gateway closed some as a client sent
on them (1-5 of 1,500 requests at 128 open waits got a reset, bench/RESULTS.md)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from varco.gateway.server import uvicorn_config
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import free_port

REQUEST = b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n"


async def app(scope: dict, receive: object, send: object) -> None:  # the smallest ASGI app: 204 to anything
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 204, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]


@pytest.fixture
def port() -> Iterator[int]:
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, Settings(_env_file=None), "127.0.0.1", port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=30)


def test_an_idle_connection_outlives_the_clients_keepalive_expiry(port: int) -> None:
    client_expiry = httpx.Limits().keepalive_expiry or 0.0  # 5 s: also the OpenAI SDK's
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(REQUEST)
        assert sock.recv(4096).startswith(b"HTTP/1.1 204")
        time.sleep(client_expiry + 1)  # idle as long as a client may still reuse the connection, and more
        sock.sendall(REQUEST)
        assert sock.recv(4096).startswith(b"HTTP/1.1 204")  # at 5 s the gateway had closed it: b""
