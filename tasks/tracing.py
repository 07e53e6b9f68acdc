"""Tracing: a job's story as one OpenTelemetry trace, from the caller's request to the webhook it receives.

The one place that configures OpenTelemetry, from the standard variables only: `OTEL_EXPORTER_OTLP_ENDPOINT`
or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (where to send), `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` (`grpc` or
`http/protobuf`, the default), `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, `OTEL_SDK_DISABLED`.

- No endpoint (or the `otel` extra not installed): nothing is imported and every call here is a no-op
  returning shared constants, so an untraced process pays a dictionary lookup per call.
- A producer inside a host application that set a tracer provider up itself (no endpoint of ours): the
  host's provider is used, so `Client.submit` joins the caller's current span and propagates it. The API
  merely being imported (redis-py imports it) is not tracing: until a real provider is set, nothing is joined.
- With an endpoint: spans are exported by the SDK's BatchSpanProcessor, from its own thread, in batches;
  a full queue drops spans and an unreachable collector costs the export thread its retries, never a job.

Context crosses processes as W3C `traceparent`/`tracestate` carriers (plain dicts): in the fair queue's job
body, on the ticket's and the callback task's Celery headers, and on the webhook POST.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "NO_SPAN",
    "TRACE_HEADERS",
    "Carrier",
    "configure",
    "context_of",
    "current_context",
    "event",
    "fail_current",
    "inject",
    "log_ids",
    "on",
    "record_error",
    "record_span",
    "shutdown",
    "span",
    "start_span",
]

Carrier = dict[str, str]
TRACE_HEADERS = ("traceparent", "tracestate")  # W3C trace context: the only carrier keys we propagate
Attributes = Mapping[str, Any]
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_KINDS = ("internal", "server", "client", "producer", "consumer")


class _NoSpan:
    """What the calls return when tracing is off: accepts everything, records nothing."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Attributes) -> None:
        pass

    def add_event(self, name: str, attributes: Attributes | None = None, timestamp: int | None = None) -> None:
        pass

    def record_exception(self, exc: BaseException, *args: Any, **kwargs: Any) -> None:
        pass

    def end(self, end_time: int | None = None) -> None:
        pass

    def is_recording(self) -> bool:
        return False


NO_SPAN: Any = _NoSpan()
_NO_SPAN_CM: contextlib.AbstractContextManager[Any] = contextlib.nullcontext(NO_SPAN)


class _Tracing:
    """The configured API: a tracer, the propagator and the context functions (imported only when on)."""

    def __init__(self, tracer: Any, provider: Any | None) -> None:
        from opentelemetry import context, propagate, trace

        self.tracer, self.provider = tracer, provider
        self.trace, self.context, self.propagate = trace, context, propagate
        self.kinds = {name: getattr(trace.SpanKind, name.upper()) for name in _KINDS}


_tracing: _Tracing | None = None
_configured = False
_join_host = False  # a producer with no endpoint: join the host's tracer provider once it sets one (_joined)
_JOIN_RECHECK_S = 1.0  # how often a producer asks whether its host has set a tracer provider since
_join_next_check = 0.0


def _endpoint_set() -> bool:
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    return not disabled and any(os.environ.get(name, "").strip() for name in _ENDPOINT_VARS)


def _exporter() -> Any:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    ).strip() or "http/protobuf"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: varco supports 'grpc' and 'http/protobuf'")
    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: from the OTEL_* variables


def configure(service_name: str, *, join_host: bool = False) -> bool:
    """Set tracing up for this process (once; later calls return the first answer). `service_name` is the
    default for `OTEL_SERVICE_NAME`; `join_host` (producers): without an endpoint, use the tracer provider of
    a host application that imported OpenTelemetry already. True when spans are made."""
    global _tracing, _configured, _join_host
    if _configured:
        return _tracing is not None
    _configured = True
    if _endpoint_set():
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            import logging

            logging.getLogger(__name__).warning(
                "an OTLP endpoint is set but OpenTelemetry is not installed: pip install 'varco-queue[otel]'"
            )
            return False
        resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name})
        provider = TracerProvider(resource=resource)  # its sampler comes from OTEL_TRACES_SAMPLER
        provider.add_span_processor(BatchSpanProcessor(_exporter()))
        trace.set_tracer_provider(provider)
        _tracing = _Tracing(provider.get_tracer("varco"), provider)
    elif join_host:
        _join_host = True
        _joined()
    return _tracing is not None


def _joined() -> bool:
    """A producer without an endpoint of its own: join the host application's tracing once the host has set a
    real tracer provider. The API being imported proves nothing (redis-py imports it), and joining its default
    proxy made every submit pay ~13 us for spans that record nothing (bench/tracing_off_path.py). Asked at
    most once a second, so a host that sets its provider after creating the Client is joined within one."""
    global _tracing, _join_host, _join_next_check
    now = time.monotonic()
    if now < _join_next_check:
        return False
    _join_next_check = now + _JOIN_RECHECK_S
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # not imported: nothing in this process traces, and we import nothing
        return False
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return False  # the API's default: nothing set (yet)
    _tracing, _join_host = _Tracing(provider.get_tracer("varco"), None), False
    return True


def on() -> bool:
    """Whether spans are made in this process (configuring it with the default service name if need be)."""
    return _tracing is not None or (not _configured and configure("varco"))


def tracer_provider() -> Any | None:
    """The provider `configure` built (for instrumentations), or None."""
    return _tracing.provider if _tracing is not None else None


def shutdown() -> None:
    """Flush and stop the exporter (bounded by OTEL_BSP_EXPORT_TIMEOUT); the SDK also does this at exit."""
    if _tracing is not None and _tracing.provider is not None:
        _tracing.provider.shutdown()


# --- context ---------------------------------------------------------------------------------------
def inject() -> Carrier:
    """The current context as a W3C carrier ({} when off or no span is current)."""
    carrier: Carrier = {}
    if _tracing is not None or (_join_host and _joined()):
        _tracing.propagate.inject(carrier)  # type: ignore[union-attr]
    return carrier


def context_of(carrier: Mapping[str, Any] | None) -> Any:
    """The context a carrier names (None when off or there is none); for `parent=`."""
    if _tracing is None or not carrier:
        return None
    clean = {k: v for k, v in carrier.items() if isinstance(k, str) and isinstance(v, str)}
    return _tracing.propagate.extract(clean) if clean else None


def current_context() -> Any:
    """The current context, to hand to another thread as `parent=` (None when off)."""
    return _tracing.context.get_current() if _tracing is not None else None


def log_ids() -> dict[str, str]:
    """`trace_id` and `span_id` of the current span, hex, for a log line ({} when none)."""
    if _tracing is None:
        return {}
    ctx = _tracing.trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


# --- spans -----------------------------------------------------------------------------------------
def _clean(attributes: Attributes | None) -> dict[str, Any]:
    return {k: v for k, v in (attributes or {}).items() if v is not None}


def _links(carriers: Sequence[Carrier] | None) -> list[Any]:
    assert _tracing is not None
    links = []
    for carrier in carriers or ():
        ctx = context_of(carrier)
        span_context = _tracing.trace.get_current_span(ctx).get_span_context() if ctx is not None else None
        if span_context is not None and span_context.is_valid:
            links.append(_tracing.trace.Link(span_context))
    return links


def span(
    name: str,
    attributes: Attributes | None = None,
    *,
    kind: str = "internal",
    parent: Any = None,
    links: Sequence[Carrier] | None = None,
) -> contextlib.AbstractContextManager[Any]:
    """A span around a block, current inside it (a child of `parent`, a context, else of the current span).
    An exception leaving the block marks the span an error (`record_error`)."""
    if _tracing is None and not (_join_host and _joined()):
        return _NO_SPAN_CM
    assert _tracing is not None
    return _erring(_tracing.tracer.start_as_current_span(
        name, context=parent, kind=_tracing.kinds[kind], attributes=_clean(attributes), links=_links(links),
        record_exception=False, set_status_on_exception=False,  # the SDK's would export the message unredacted
    ))  # fmt: skip


@contextlib.contextmanager
def _erring(current: contextlib.AbstractContextManager[Any]) -> Iterator[Any]:
    with current as opened:
        try:
            yield opened
        except Exception as exc:
            record_error(opened, exc)
            raise


def record_error(span: Any, exc: BaseException | None = None, *, error_type: str | None = None,
                 message: str = "") -> None:  # fmt: skip
    """Mark `span` failed: error status, `error.type` and an `exception` event, the message redacted as in the
    logs (an image URL's query string, a credential; tasks/redaction.py). No stack trace: it repeats the
    message. Either an exception, or an `error_type` and `message` (a job's ErrorInfo)."""
    if _tracing is None or not span.is_recording():
        return
    from varco.tasks.redaction import redact_text

    error_type = error_type or type(exc).__name__
    message = redact_text(str(exc) if exc is not None else message)[:1000]
    span.set_attribute("error.type", error_type)
    span.add_event("exception", {"exception.type": error_type, "exception.message": message})
    span.set_status(_tracing.trace.Status(_tracing.trace.StatusCode.ERROR, f"{error_type}: {message}"[:1000]))


def fail_current(error_type: str, message: str) -> None:
    """Mark the current span failed (a job that ends failed: its error was caught, not raised through it)."""
    if _tracing is not None:
        record_error(_tracing.trace.get_current_span(), error_type=error_type, message=message)


def start_span(name: str, attributes: Attributes | None = None, *, kind: str = "internal", parent: Any = None,
               start_ns: int | None = None) -> Any:  # fmt: skip
    """A span that is not made current (for a thread serving many jobs); the caller ends it."""
    if _tracing is None:
        return NO_SPAN
    return _tracing.tracer.start_span(
        name, context=parent, kind=_tracing.kinds[kind], attributes=_clean(attributes), start_time=start_ns
    )


def record_span(name: str, start_ns: int, end_ns: int | None = None, attributes: Attributes | None = None, *,
                parent: Any = None) -> None:  # fmt: skip
    """A span for something that already happened (the time a job waited in the queue)."""
    if _tracing is None:
        return
    end_ns = end_ns or time.time_ns()
    start_span(name, attributes, parent=parent, start_ns=min(start_ns, end_ns)).end(end_time=end_ns)


def event(name: str, attributes: Attributes | None = None) -> None:
    """An event on the current span (a status transition, a store retry, a cancel)."""
    if _tracing is not None:
        _tracing.trace.get_current_span().add_event(name, _clean(attributes))


@contextlib.contextmanager
def attached(parent: Any) -> Iterator[None]:
    """Make `parent` (a context from `current_context`/`context_of`) current inside the block."""
    if _tracing is None or parent is None:
        yield
        return
    token = _tracing.context.attach(parent)
    try:
        yield
    finally:
        _tracing.context.detach(token)
