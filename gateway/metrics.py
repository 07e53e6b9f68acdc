"""Prometheus metrics of the gateway's HTTP traffic, in a registry of the app's own.

Plain ASGI middleware rather than Starlette's BaseHTTPMiddleware: that one reads the request in a
task group of its own, where an error raised while a body streams in (limits.py) would escape the
problem handlers as a bare 500.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HttpMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "varco_gateway_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.duration = Histogram(
            "varco_gateway_request_duration_seconds", "Time to the response's start", ["method", "route"],
            registry=self.registry,
        )  # fmt: skip
        self.submitted = Counter("varco_gateway_jobs_submitted", "Jobs enqueued through the gateway",
                                 registry=self.registry)  # fmt: skip

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def measured(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            start = time.perf_counter()
            started = False

            def count(status: int) -> None:
                route = getattr(scope.get("route"), "path", "unmatched")  # the template, not the job id
                self.requests.labels(scope["method"], route, str(status)).inc()
                self.duration.labels(scope["method"], route).observe(time.perf_counter() - start)

            async def send_and_count(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    count(message["status"])
                await send(message)

            try:
                await app(scope, receive, send_and_count)
            except Exception:
                # Starlette's ServerErrorMiddleware sits outside every user middleware: it answers this
                # request 500 after the exception has passed here, so the 500 is counted here.
                if not started:
                    count(500)
                raise

        return measured
