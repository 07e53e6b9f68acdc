"""Prometheus metrics of the gateway's HTTP traffic, in a registry of the app's own."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram


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

    async def middleware(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")  # the template, not the job id
        self.requests.labels(request.method, route, str(response.status_code)).inc()
        self.duration.labels(request.method, route).observe(time.perf_counter() - start)
        return response
