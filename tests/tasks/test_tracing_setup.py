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


# --- a producer's submit: what it carries, with and without OpenTelemetry ---------------------------
SUBMIT = """
import importlib.abc, json, logging, sys, tempfile
from pathlib import Path
if {block}:  # the otel packages not installed: every opentelemetry import fails, as it would
    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, Absent())
logging.basicConfig(level=logging.WARNING)
from varco.producer import Client
from varco.tasks import tracing
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import start_redis

def carried(client):
    found = []
    for key in client.redis.keys("*"):
        kind = client.redis.type(key)
        values = (client.redis.lrange(key, 0, -1) if kind == "list" else client.redis.hvals(key) if kind == "hash"
                  else [client.redis.get(key)] if kind == "string" else [])
        found += [key for v in values if "traceparent" in (v or "")]
    return sorted(set(found))

with tempfile.TemporaryDirectory() as tmp, start_redis(Path(tmp)) as server:
    client = Client(Settings(broker_url=server.url, _env_file=None))
    first = client.submit("https://cdn.example.com/cat.jpg", "caption")
    untraced, on_before = carried(client), tracing.on()
    host = None
    if {host}:  # the host application sets its tracer provider after making the Client
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        trace.set_tracer_provider(TracerProvider())
        tracing._join_next_check = 0.0  # (asked once a second: do not wait for it)
        with trace.get_tracer("host").start_as_current_span("request") as span:
            host = format(span.get_span_context().trace_id, "032x")
            second = client.submit("https://cdn.example.com/dog.jpg", "caption")
        body = client.fair.pick("varco", "ticket-2")  # FIFO within the tenant: the first job, then the second
        body = client.fair.pick("varco", "ticket-3")
        host = [host, body.job_id == second, body.trace.get("traceparent", "").split("-")[1:2]]
    print(json.dumps({{"status": client.status(first).state.value, "untraced": untraced, "on": on_before,
                      "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry")), "host": host}}))
"""


def submit_probe(block: bool = False, host: bool = False, **env: str) -> tuple[dict, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VARCO_"))}
    code = SUBMIT.format(block=block, host=host)
    out = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1]), out.stderr


def test_a_producer_without_the_otel_packages_submits_and_carries_nothing() -> None:
    # Even told to export (an endpoint set): it says the extra is missing, and submits as before.
    found, stderr = submit_probe(block=True, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    assert found == {"status": "queued", "untraced": [], "on": False, "otel": [], "host": None}
    assert "OpenTelemetry is not installed" in stderr


def test_a_producer_joins_its_host_only_once_the_host_sets_a_tracer_provider() -> None:
    pytest.importorskip("opentelemetry.sdk")
    found, _ = submit_probe(host=True)
    # redis-py imported the API, yet before the host set a provider tracing stayed off: nothing carried, and
    # no span made through the API's proxy (which cost every submit ~13 us: bench/tracing_off_path.py).
    assert found["untraced"] == [] and found["on"] is False and "opentelemetry.trace" in found["otel"]
    host_trace, picked_second, [carried_trace] = found["host"]
    assert picked_second and carried_trace == host_trace  # then the submit joined the host's current span
