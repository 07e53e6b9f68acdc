"""Request body limits as ASGI middleware: a size cap (413) and one deadline for the whole body (408).

uvicorn bounds the request head (h11's incomplete-event size, http_protocol.py), idle keep-alive
connections and concurrent connections (server.py); it has no limit on a body's size or on how
slowly it arrives, hence this.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from varco.gateway.openai_errors import is_openai_path, problem_as_openai
from varco.gateway.problems import Problem, problem_response


class BodyLimits:
    def __init__(
        self, app: ASGIApp, max_bytes: int, read_timeout_s: float, uploads: tuple[str, int] | None = None
    ) -> None:
        """`uploads`: a path whose bodies may be larger (the files API's), and their limit; they get no
        read timeout of their own beyond the server's (a 200 MB file takes a while)."""
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s
        self.uploads = uploads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.uploads is not None and scope["path"] == self.uploads[0] and scope["method"] == "POST":
            limit, timeout = self.uploads[1], 3600.0
        else:
            limit, timeout = self.max_bytes, self.read_timeout_s
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            too_large = Problem(413, "body-too-large", self._too_large(limit))
            if is_openai_path(scope["path"]):  # those routes answer in OpenAI's error shape
                response = problem_as_openai(too_large).response()
            else:
                response = problem_response(too_large.status, too_large.kind, too_large.detail)
            await response(scope, receive, send)
            return
        received = 0
        done = False
        deadline: float | None = None  # one for the whole body, set by its first read: a sender that
        # trickles a byte now and then cannot hold the request open longer than read_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, done, deadline
            if done:  # the body is in: later receives wait for a disconnect (streaming responses)
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + timeout
            try:
                async with asyncio.timeout_at(deadline):
                    message: dict[str, Any] = dict(await receive())
            except TimeoutError:
                detail = f"request body not received within {timeout:g}s (VARCO_GATEWAY_BODY_TIMEOUT_S)"
                raise Problem(408, "body-timeout", detail) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise Problem(413, "body-too-large", self._too_large(limit))
                done = not message.get("more_body", False)
            return message  # type: ignore[return-value]

        await self.app(scope, limited_receive, send)

    def _too_large(self, limit: int) -> str:
        return f"request body is over {limit} bytes (VARCO_GATEWAY_MAX_BODY_BYTES)"
