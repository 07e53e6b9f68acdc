"""A local OTLP/HTTP trace receiver for tests, and a text rendering of the spans it received.

It is what a collector is to our processes: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`,
decoded with opentelemetry-proto, so a test sees exactly what crossed the process boundary (no in-process
exporter). `render` draws one trace as an indented tree (the README's picture of a job's trace).
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    name: str
    kind: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # linked span contexts as "trace_id:span_id"
    status: int = 0  # 2: error


class OTLPReceiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    outer.requests += 1
                    outer.spans.extend(_spans(request))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        """The value for OTEL_EXPORTER_OTLP_ENDPOINT (the exporter appends /v1/traces)."""
        return f"http://127.0.0.1:{self.server.server_port}"

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in list(self.spans) if s.trace_id == trace_id]

    def wait_for(self, predicate: Callable[[list[Span]], bool], timeout: float = 60.0) -> list[Span]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(list(self.spans)):
                return list(self.spans)
            time.sleep(0.1)
        raise AssertionError(f"spans never arrived as expected; got {sorted({s.name for s in self.spans})}")

    def close(self) -> None:
        self.server.shutdown()


def _spans(request: ExportTraceServiceRequest) -> list[Span]:
    found = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                found.append(Span(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                    name=s.name, kind=KINDS.get(s.kind, str(s.kind)), service=str(resource.get("service.name")),
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    attributes={a.key: _value(a.value) for a in s.attributes},
                    events=[(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in s.events],
                    links=[f"{link.trace_id.hex()}:{link.span_id.hex()}" for link in s.links],
                    status=s.status.code,
                ))  # fmt: skip
    return found


_SHOWN = ("varco.job_id", "varco.task", "varco.tenant", "varco.engine", "varco.worker", "error.type",
          "varco.batch.size", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "url.full", "http.route",
          "http.response.status_code", "varco.webhook.event")  # fmt: skip


def render(spans: list[Span], outside_parent: str = "") -> str:
    """One trace as an indented text tree: service, span name, duration, offset from the first span, a few
    attributes, and events. `outside_parent`: the caller's span id (not exported here), drawn as the root."""
    by_parent: dict[str, list[Span]] = {}
    for s in spans:
        by_parent.setdefault(s.parent_id, []).append(s)
    t0 = min(s.start_ns for s in spans)
    lines = [f"trace {spans[0].trace_id}" + (f"  (caller's span {outside_parent})" if outside_parent else "")]

    def draw(parent: str, depth: int) -> None:
        for s in sorted(by_parent.get(parent, []), key=lambda x: x.start_ns):
            shown = " ".join(f"{k}={s.attributes[k]}" for k in _SHOWN if k in s.attributes)
            offset, took = (s.start_ns - t0) / 1e6, (s.end_ns - s.start_ns) / 1e6
            head = f"{'  ' * depth}└ [{s.service}] {s.name} ({s.kind}) +{offset:.1f}ms {took:.1f}ms"
            lines.append(f"{head}  {shown}".rstrip())
            for name, attributes in s.events:
                detail = " ".join(f"{k}={v}" for k, v in attributes.items())
                lines.append(f"{'  ' * (depth + 1)}· event {name} {detail}".rstrip())
            draw(s.span_id, depth + 1)

    ids = {s.span_id for s in spans}
    for root in sorted({s.parent_id for s in spans if s.parent_id not in ids}):
        draw(root, 1)
    return "\n".join(lines)
