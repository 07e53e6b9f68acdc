"""Every gateway response a test sees, checked against the gateway's own /openapi.json.

`recording()` wraps httpx's send (sync and async) while a test runs; `check(responses)` then finds each
response's documented operation (path template and method) and status, and validates its media type and,
for JSON, its body with jsonschema (OpenAPI 3.1 schemas are JSON Schema 2020-12). Requests to paths the
document does not name (webhook receivers, S3, unknown paths) and methods it does not list (405s) are
not the document's business and are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema

_DOCUMENTED_BY_MEDIA = ("application/json", "application/problem+json")


@functools.cache
def document() -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from varco.gateway.app import create_app
    from varco.tasks.settings import Settings

    return TestClient(create_app(Settings(), ["spec-check-key-0123456789"])).get("/openapi.json").json()


@functools.cache
def _templates() -> list[tuple[re.Pattern[str], str]]:
    found = []
    for path in document()["paths"]:
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path))
        found.append((re.compile(f"^{pattern}$"), path))
    return found


def _operation(method: str, path: str) -> dict[str, Any] | None:
    for pattern, template in _templates():
        if pattern.match(path):
            return document()["paths"][template].get(method.lower())
    return None


def problems_with(response: httpx.Response) -> list[str]:
    """What the document gets wrong about this response (empty when it is described exactly)."""
    request = response.request
    operation = _operation(request.method, request.url.path)
    if operation is None:
        return []
    where = f"{request.method} {request.url.path} -> {response.status_code}"
    responses = operation["responses"]
    documented = responses.get(str(response.status_code)) or responses.get("default")
    if documented is None:
        return [f"{where}: status not documented ({sorted(responses)})"]
    media = response.headers.get("content-type", "").split(";")[0].strip()
    content = documented.get("content")
    if not content:  # a redirect or an empty answer: nothing more to check
        return []
    matches = [m for m in content if m == media or (m.endswith("/*") and media.startswith(m[:-1]))]
    if not matches:
        return [f"{where}: content-type {media!r} not documented ({sorted(content)})"]
    schema = content[matches[0]].get("schema")
    if media not in _DOCUMENTED_BY_MEDIA or schema is None or not response.is_stream_consumed:
        return []
    root = {**schema, "components": document()["components"]}
    errors = jsonschema.Draft202012Validator(root).iter_errors(response.json())
    return [f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@contextlib.contextmanager
def recording() -> Iterator[list[httpx.Response]]:
    """Collect every response httpx clients receive inside the block."""
    seen: list[httpx.Response] = []
    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

    def send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = sync_send(self, request, **kwargs)
        seen.append(response)
        return response

    async def asend(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = await async_send(self, request, **kwargs)
        seen.append(response)
        return response

    httpx.Client.send, httpx.AsyncClient.send = send, asend  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        httpx.Client.send, httpx.AsyncClient.send = sync_send, async_send  # type: ignore[method-assign]


def check(responses: list[httpx.Response]) -> None:
    found = [problem for response in responses for problem in problems_with(response)]
    assert not found, "responses the OpenAPI document does not describe:\n" + "\n".join(found[:20])
