"""Prometheus metrics of the gateway's HTTP traffic, in a registry of the app's own.

Plain ASGI middleware rather than Starlette's BaseHTTPMiddleware: that one reads the request in a
task group of its own, where an error raised while a body streams in (limits.py) would escape the
problem handlers as a bare 500.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HttpMetrics:
    def __init__(self) -> None:
        # The `*_created` series would reach Prometheus as gauges of a timestamp, one per series: dropped
        # (process-wide: the gateway's process has no other registry).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_*: CPU seconds, memory, open fds, start time
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

            async def send_and_count(message: Message) -> None:
                if message["type"] == "http.response.start":
                    route = getattr(scope.get("route"), "path", "unmatched")  # the template, not the job id
                    self.requests.labels(scope["method"], route, str(message["status"])).inc()
                    self.duration.labels(scope["method"], route).observe(time.perf_counter() - start)
                await send(message)

            await app(scope, receive, send_and_count)

        return measured
