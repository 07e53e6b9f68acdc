"""Small real servers for tests: an HTTP image server and a webhook receiver, both on loopback.

Needs only the base install (no Pillow): the parser and request tests import it there too. Image
builders live in `images.py`.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from varco.workers.devtools.local_worker import VARCO_CLI  # noqa: F401  (tests import it from here)

# Loopback is the only network tests have: with the `scripted_dns` fixture, 127.0.0.2 plays a public address.
PUBLIC = "127.0.0.2"


def _fixtures() -> Path:
    """`shared/fixtures` beside the checkout: the nearest ancestor that has it, so the tests find it
    from a copy of the tree too (mutmut runs them from `mutants/`, one level deeper)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "fixtures").is_dir():
            return parent / "shared" / "fixtures"
    raise FileNotFoundError("no shared/fixtures above " + str(Path(__file__).parent))


FIXTURES = _fixtures()


def card_output(name: str) -> str:
    """A model-card example output; the fixture's final newline is not part of it (fixtures/README)."""
    text = (FIXTURES / f"card_{name}_output.txt").read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Status codes to answer before the real response, one per request (to test retries).
    failures: list[int] = field(default_factory=list)
    hits: int = 0
    hit_times: list[float] = field(default_factory=list)  # time.monotonic() of each request
    # False: no Content-Length, the body ends when the connection closes (the reader must count bytes).
    send_length: bool = True
    error_body: bytes = b"error"  # the body of an answer >= 300 (an S3 error document, say)
    # Seconds to wait before answering: a job held this long in its fetch, however fast the machine.
    delay_s: float = 0.0


class ServedFiles:
    """A threaded HTTP server on 127.0.0.1 (or `host`) answering from a dict of routes; HTTPS with `tls`."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.host_headers: list[str] = []  # the Host header of every request, in order
        self.user_agents: list[str] = []  # the User-Agent header of every request, in order
        routes, host_headers, user_agents = self.routes, self.host_headers, self.user_agents

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host_headers.append(self.headers.get("host", ""))
                user_agents.append(self.headers.get("user-agent", ""))
                route = routes.get(self.path)
                if route is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                route.hits += 1
                route.hit_times.append(time.monotonic())
                time.sleep(route.delay_s)
                status = route.failures.pop(0) if route.failures else route.status
                self.send_response(status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                body = route.body if status < 300 else route.error_body
                if route.send_length:
                    self.send_header("content-length", str(len(body)))
                else:
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.scheme = "https" if tls else "http"
        if tls:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_port

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.server.server_address[0]}:{self.server.server_port}"

    def add(self, path: str, body: bytes = b"", **kwargs: Any) -> str:
        self.routes[path] = Route(body=body, **kwargs)
        return self.base + path

    def close(self) -> None:
        self.server.shutdown()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """Records every POST; answers with `status_for(path)` (default 204)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.status_for: Callable[[str], int] = lambda path: 204
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.received.append(Received(self.path, dict(self.headers.items()), body))
                self.send_response(outer.status_for(self.path))
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(list(self.received)):
                return list(self.received)
            time.sleep(0.1)
        raise AssertionError(f"webhooks never arrived as expected; got {[r.path for r in self.received]}")

    def close(self) -> None:
        self.server.shutdown()


class ScriptedResolver:
    """getaddrinfo that answers scripted names with successive addresses (the last one repeats)."""

    def __init__(self, real) -> None:
        self.real = real
        self.answers: dict[str, list[str]] = {}
        self.calls: Counter[str] = Counter()

    def __call__(self, host, port, *args, **kwargs):
        if host not in self.answers:
            return self.real(host, port, *args, **kwargs)
        seq = self.answers[host]
        address = seq[min(self.calls[host], len(seq) - 1)]
        self.calls[host] += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port or 0)))]
