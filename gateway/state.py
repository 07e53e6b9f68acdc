"""What the app's handlers share, kept on `app.state.gateway`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request

from varco.gateway.auth import KeyRing
from varco.gateway.metrics import HttpMetrics
from varco.gateway.open_streams import OpenStreams
from varco.gateway.ratelimit import RateLimiter
from varco.producer import Client
from varco.tasks.async_status import AsyncStatusStore
from varco.tasks.delta_stream import AsyncDeltaStream


@dataclass
class GatewayState:
    client: Client
    keys: KeyRing | None  # None: --no-auth, every caller sees every job
    limiter: RateLimiter | None
    metrics: HttpMetrics
    statuses: AsyncStatusStore  # reading and watching jobs (SSE, result?wait) without blocking the event loop
    deltas: AsyncDeltaStream  # streamed jobs' text as generated (SSE `delta` events, streamed chat completions)

    overlay_renders: asyncio.Semaphore  # overlays drawn at once (VARCO_GATEWAY_OVERLAY_RENDERS)
    streams: OpenStreams  # open event streams: the cap per key, and their end at shutdown


def gateway(request: Request) -> GatewayState:
    return request.app.state.gateway
