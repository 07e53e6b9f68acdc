"""The OpenAPI document (/openapi.json), made to say exactly what the server does.

FastAPI's generated document is close but not exact, and generators read it literally (openapi-typescript
makes a property with a `default` required, and types an optional one as always present if it is listed in
`required`). So, after FastAPI builds it:
- request bodies (read raw by the routes) get their real schemas: no `"default": null`, `image_uri` at least
  one character, the Idempotency-Key's 128-character limit, no `tenant` (the API key names it);
- our response models list every property as required: the server always sends them all (null when unset);
- a problem document says which members it may carry (state, error, enqueued, limit, depth);
- a status's `task` is the task enum, parameters are never `null`, the event stream describes its events.
Operation ids are the handlers' names (`submit_job`), set by `operation_id` in app.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from varco.gateway.problems import ProblemDetails
from varco.tasks.requests import CALLBACK_EVENTS

REF = "#/components/schemas/"
# Response models the jobs API serialises whole (FastAPI's response_model: every field, null when unset).
WHOLE_RESPONSES = ("Submitted", "BatchSubmitted", "JobStatus", "JobResult", "Health")
_JSON = {"type": "string", "contentMediaType": "application/json"}
_SSE_EVENT = {
    "description": "one Server-Sent Event. `retry: 5000` first; `id` (status and delta events) is what a "
                   "reconnect sends back as `Last-Event-ID`; `end` closes a finished job's stream, `interrupted` "
                   "one cut short (reconnect)",
    "oneOf": [
        {"type": "object", "properties": {"retry": {"const": 5000}}, "required": ["retry"]},
        {"type": "object", "required": ["event", "id", "data"], "properties": {
            "event": {"const": "status"}, "id": {"type": "string"},
            "data": _JSON | {"contentSchema": {"$ref": REF + "JobStatus"}}}},
        {"type": "object", "required": ["event", "id", "data"], "properties": {
            "event": {"const": "delta"}, "id": {"type": "string"},
            "data": _JSON | {"contentSchema": {"type": "object", "required": ["text"],
                                               "properties": {"text": {"type": "string"}}}}}},
        {"type": "object", "required": ["event", "data"], "properties": {
            "event": {"const": "end"},
            "data": _JSON | {"contentSchema": {"type": "object", "required": ["job_id", "state"], "properties": {
                "job_id": {"type": "string"},
                "state": {"anyOf": [{"$ref": REF + "JobState"}, {"type": "null"}],
                          "description": "the final state; null when the record expired first"}}}}}},
        {"type": "object", "required": ["event", "data"], "properties": {
            "event": {"const": "interrupted"},
            "data": _JSON | {"contentSchema": {"type": "object", "required": ["reason", "detail"], "properties": {
                "reason": {"type": "string", "enum": ["shutdown", "broker-unavailable"]},
                "detail": {"type": "string"}}}}}},
    ],
}  # fmt: skip


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object inside `node`, itself included."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [X, {type: null}]` as X (keeping title/description)."""
    options = schema.get("anyOf")
    if not options or {"type": "null"} not in options or len(options) != 2:
        return schema
    [kept] = [o for o in options if o != {"type": "null"}]
    return {**{k: v for k, v in schema.items() if k not in ("anyOf", "default")}, **kept}


def _refs(schemas: dict[str, Any], names: tuple[str, ...]) -> set[str]:
    """`names` and every component they reach."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen or name not in schemas:
            continue
        seen.add(name)
        for node in _walk(schemas[name]):
            if isinstance(ref := node.get("$ref"), str) and ref.startswith(REF):
                todo.append(ref.removeprefix(REF))
    return seen


def _component(model: type[BaseModel], schemas: dict[str, Any]) -> None:
    found = model.model_json_schema(ref_template=REF + "{model}")
    schemas.update(found.pop("$defs", {}))
    schemas[model.__name__] = found


def _request_schemas(schemas: dict[str, Any], max_idempotency_key: int) -> None:
    job = schemas["JobRequest"]
    job["properties"].pop("tenant", None)
    job["properties"] = {name: _not_null(prop) for name, prop in job["properties"].items()}
    for prop in job["properties"].values():  # a default (`stream: false`) would make the input required too
        if "default" in prop:
            default = json.dumps(prop.pop("default"))
            prop["description"] = (prop.get("description", "") + f" Default: {default}.").strip()
    job["properties"]["image_uri"]["minLength"] = 1
    job["properties"]["idempotency_key"]["maxLength"] = max_idempotency_key
    job["properties"]["callback_events"]["items"] = {"type": "string", "enum": list(CALLBACK_EVENTS)}


def _problem_schema(schemas: dict[str, Any]) -> None:
    problem = schemas["ProblemDetails"]
    props = {name: _not_null(prop) for name, prop in problem["properties"].items()}
    props |= {
        "state": {"$ref": REF + "JobState", "description": "the job's state, on a 409 about it"},
        "error": {"$ref": REF + "ErrorInfo", "description": "why the job failed (job-failed)"},
        "enqueued": {"type": "array", "items": {"type": "string"},
                     "description": "jobs a batch enqueued before Redis went away (broker-unavailable)"},
        "limit": {"type": "integer", "description": "the limit reached (queue-full, too-many-streams)"},
        "depth": {"type": "integer", "description": "the queue's depth then (queue-full)"},
    }  # fmt: skip
    problem["properties"] = props
    problem["required"] = ["type", "title", "status", "detail"]


def _responses_whole(schemas: dict[str, Any]) -> None:
    for name in _refs(schemas, WHOLE_RESPONSES):
        schema = schemas[name]
        if schema.get("type") == "object" and "properties" in schema:
            schema["required"] = list(schema["properties"])
            for prop in schema["properties"].values():
                prop.pop("default", None)
    task = schemas["JobStatus"]["properties"]["task"]
    task["anyOf"] = [{"$ref": REF + "TaskType"}, {"type": "null"}]
    schemas["JobResult"]["properties"]["task"] = {"$ref": REF + "TaskType"}


def _parameters(paths: dict[str, Any], max_idempotency_key: int) -> None:
    for operations in paths.values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                parameter["schema"] = _not_null(parameter["schema"])
                if parameter["name"] == "Idempotency-Key":
                    parameter["schema"] |= {"minLength": 1, "maxLength": max_idempotency_key}


def _event_stream(paths: dict[str, Any]) -> None:
    stream = paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
    stream["schema"] = {"type": "string", "description": "a text/event-stream: `status` events, then `end`"}
    stream["itemSchema"] = _SSE_EVENT  # OpenAPI 3.2's way to type each event; older readers ignore it


def _chat_body(paths: dict[str, Any]) -> None:
    """The chat route reads its body raw too; say that one is needed, if its own module has not described it."""
    chat = paths.get("/v1/chat/completions", {}).get("post")
    if chat is not None and "requestBody" not in chat:
        schema = {"type": "object", "description": "OpenAI's chat completion request: a user message, image and text"}
        chat["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}


def finish(schema: dict[str, Any], extra_models: tuple[type[BaseModel], ...], max_idempotency_key: int) -> None:
    """Fix FastAPI's document in place (see the module's docstring)."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (*extra_models, ProblemDetails):
        _component(model, schemas)
    _request_schemas(schemas, max_idempotency_key)
    _problem_schema(schemas)
    _responses_whole(schemas)
    _parameters(schema["paths"], max_idempotency_key)
    _event_stream(schema["paths"])
    _chat_body(schema["paths"])
