"""The app factory: routes, problem handlers, body limits, metrics, health, and the OpenAPI document."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from varco.gateway import openai_batches, openai_files, openai_routes, openapi_doc, page, problems, routes
from varco.gateway.auth import KeyRing
from varco.gateway.limits import BodyLimits
from varco.gateway.metrics import HttpMetrics
from varco.gateway.open_streams import OpenStreams
from varco.gateway.ratelimit import RateLimiter
from varco.gateway.state import GatewayState
from varco.producer import Client
from varco.tasks import tracing
from varco.tasks.async_status import AsyncStatusStore
from varco.tasks.connections import BrokerUnavailable, async_redis_client
from varco.tasks.delta_stream import AsyncDeltaStream
from varco.tasks.requests import JobRequest
from varco.tasks.settings import Settings


class JobBatch(BaseModel):
    """`POST /v1/jobs/batch`: up to VARCO_GATEWAY_MAX_BATCH jobs (100 by default)."""

    jobs: list[JobRequest] = Field(min_length=1)


class Health(BaseModel):
    status: str
    reasons: list[str] = Field(default_factory=list)


async def _broker_unavailable(_: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, BrokerUnavailable):
        # `enqueued`: the jobs a batch had enqueued before Redis went away; a client resubmits only the rest.
        return problems.problem_response(503, "broker-unavailable", str(exc), {"Retry-After": "5"},
                                         enqueued=exc.enqueued)  # fmt: skip
    detail = f"Redis is unavailable: {type(exc).__name__}: {exc}"
    return problems.problem_response(503, "broker-unavailable", detail, {"Retry-After": "5"})


def _instrument(app: FastAPI) -> None:
    """A server span per request (HTTP semantic conventions), a child of the caller's `traceparent`; the
    per-message `http send`/`receive` spans are left out (an SSE stream would make one per frame). The stable
    HTTP semantic conventions (`http.response.status_code`, `url.path`), as our own spans use, unless the
    operator chose otherwise: the instrumentation's default is still the old names (`http.status_code`)."""
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")  # read once, when first instrumenting
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=tracing.tracer_provider(),
        exclude_spans=["receive", "send"],
        excluded_urls="livez,readyz,metrics",
    )


def gateway_redis(settings: Settings) -> aioredis.Redis:
    """The gateway's asyncio Redis client. A streamed job's reader holds a connection while it blocks on the
    job's text (XREAD), beside a record read at times: two per request at most, so the pool never runs out
    before uvicorn's own limit (VARCO_GATEWAY_MAX_CONNECTIONS, a 503 at once). redis-py's default of 100 failed
    the 101st stream with MaxConnectionsError."""
    return async_redis_client(settings, max_connections=2 * settings.gateway_max_connections + 1)


def create_app(settings: Settings, keys: list[str] | None, *, client: Client | None = None) -> FastAPI:
    """`keys=None` serves without authentication (`varco gateway --no-auth`)."""
    metrics = HttpMetrics()
    streams = OpenStreams(settings.gateway_max_streams_per_key)  # server.py ends them at SIGTERM

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        statuses = AsyncStatusStore(gateway_redis(settings))
        sync_client = client or Client(settings)
        app.state.gateway = GatewayState(
            client=sync_client,
            keys=KeyRing(keys) if keys is not None else None,
            limiter=RateLimiter(settings.rate_limit) if settings.rate_limit else None,
            metrics=metrics,
            statuses=statuses,
            deltas=AsyncDeltaStream(statuses.redis),
            overlay_renders=asyncio.Semaphore(settings.gateway_overlay_renders),
            streams=streams,
        )
        try:
            yield
        finally:
            await statuses.aclose()
            if client is None:
                sync_client.close()

    app = FastAPI(
        title="varco-queue gateway",
        version="1",
        summary="Submit VARCO-VISION jobs over HTTP, follow them, read their results.",
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # operation ids: submit_job, get_job…
    )
    app.state.streams = streams
    problems.install(app)
    app.add_exception_handler(BrokerUnavailable, _broker_unavailable)
    app.add_exception_handler(redis.exceptions.RedisError, _broker_unavailable)  # the asyncio client's own errors
    app.add_middleware(
        BodyLimits,
        max_bytes=settings.gateway_max_body_bytes,
        read_timeout_s=settings.gateway_body_timeout_s,
        uploads=(openai_files.UPLOAD_PATH, settings.batch_max_file_bytes + openai_files.MULTIPART_OVERHEAD),
    )
    app.add_middleware(metrics.middleware)  # outermost: counts 413s from BodyLimits too
    app.include_router(routes.router)
    app.include_router(openai_routes.router)
    app.include_router(openai_files.router)
    app.include_router(openai_batches.router)
    app.include_router(page.router)
    if tracing.configure("varco-gateway"):  # OTEL_* variables; no endpoint, no tracing (docs/tracing.md)
        _instrument(app)

    @app.get("/livez", response_model=Health, tags=["health"])
    async def livez() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["health"],
             responses={503: {"model": Health, "description": "Redis does not answer"}})  # fmt: skip
    async def readyz() -> Any:
        try:
            await app.state.gateway.statuses.ping()
        except Exception as exc:  # any failure to reach the broker means not ready
            return JSONResponse(Health(status="unavailable", reasons=[f"redis: {type(exc).__name__}: {exc}"])
                                .model_dump(), status_code=503)  # fmt: skip
        return Health(status="ok")

    @app.get("/metrics", response_class=Response, tags=["health"],
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})  # fmt: skip
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        # The submit bodies are read raw (so errors are InvalidRequest's own messages); document their schemas.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            openapi_doc.finish(schema, (JobBatch,), routes.MAX_IDEMPOTENCY_KEY_CHARS)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
