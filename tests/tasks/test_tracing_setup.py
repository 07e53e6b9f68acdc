"""tasks/tracing.py: no endpoint, nothing imported and nothing carried; an endpoint, W3C context carried.

Each case runs in a fresh interpreter: tracing is configured once per process, from its environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from varco.tasks.fair_queue import Picked, job_body

PROBE = """
import json, sys
from varco.producer import client  # the producer's whole import graph (redis-py itself imports opentelemetry)
from varco.tasks import tracing
before = set(sys.modules)
on = tracing.configure("probe")
with tracing.span("outer", {"varco.job_id": "j"}) as span:
    span.set_attribute("x", 1)
    tracing.event("e", {"a": 1})
    carrier = tracing.inject()
    ids = tracing.log_ids()
    with tracing.span("inner", parent=tracing.context_of(carrier)):
        inner = tracing.inject()
print(json.dumps({"on": on, "carrier": carrier, "inner": inner, "ids": ids,
                  "otel": sorted(m for m in set(sys.modules) - before if m.startswith("opentelemetry"))}))
"""


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean | env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def test_without_an_endpoint_tracing_imports_nothing_and_carries_nothing() -> None:
    found = probe()
    assert found == {"on": False, "carrier": {}, "inner": {}, "ids": {}, "otel": []}


def test_an_sdk_disabled_by_its_own_variable_stays_off() -> None:
    assert probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_SDK_DISABLED="true")["on"] is False


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_with_an_endpoint_spans_carry_w3c_context(protocol: str) -> None:
    pytest.importorskip("opentelemetry.sdk")
    # Nothing listens there: spans are made and the export fails in the background, never in the caller.
    found = probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
                  OTEL_EXPORTER_OTLP_TIMEOUT="1")  # fmt: skip
    assert found["on"] is True
    _, trace_id, span_id, flags = found["carrier"]["traceparent"].split("-")
    assert found["ids"] == {"trace_id": trace_id, "span_id": span_id} and int(flags, 16) & 1  # sampled
    _, inner_trace, inner_span, _ = found["inner"]["traceparent"].split("-")
    assert inner_trace == trace_id and inner_span != span_id  # a child, in the same trace


def test_the_job_body_carries_the_trace_context_only_when_there_is_one() -> None:
    carrier = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    traced = Picked("j", "t", json.loads(job_body("j", {"task": "ocr"}, "2026-01-01T00:00:00+00:00", carrier)), False)
    assert traced.trace == carrier and traced.task_args == (("j", {"task": "ocr"}), {"enqueued_at": traced.body[
        "kwargs"]["enqueued_at"]})  # fmt: skip
    plain = json.loads(job_body("j", {"task": "ocr"}, "2026-01-01T00:00:00+00:00"))
    assert "trace" not in plain and Picked("j", "t", plain, False).trace == {}
    assert Picked("j", "t", {**plain, "trace": ["not", "a", "dict"]}, False).trace == {}  # untrusted: ignored
