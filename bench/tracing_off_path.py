"""What tracing costs a producer's submit when nobody traces (issue 23: "no endpoint, no cost").

A `Client.submit` makes two tracing calls per job: the `varco.submit` span around it and `inject()` for
the job's body. This times exactly those calls, as `Client.__init__` leaves them configured (no OTLP
endpoint, `join_host=True`), in a process that imported the producer's whole graph (redis-py itself
imports the OpenTelemetry API), against the same loop with a bare `nullcontext`.

Run: .venv/bin/python bench/tracing_off_path.py [--jobs 200000]
`--host-provider` also times a host application that set a real SDK TracerProvider (no exporter): what
joining its trace costs per submit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

for name in [k for k in os.environ if k.startswith("OTEL_")]:
    del os.environ[name]  # no endpoint: tracing off

from varco.producer import client  # noqa: E402  (the producer's import graph, as a host application has it)
from varco.tasks import tracing  # noqa: E402


def per_job_us(jobs: int, traced: bool) -> float:
    """Microseconds per job of the submit's tracing calls (best of 5 rounds)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        if traced:
            for _ in range(jobs):
                with client._submit_span("ocr", "default"):
                    tracing.inject()
        else:
            for _ in range(jobs):
                with contextlib.nullcontext():
                    pass
        best = min(best, time.perf_counter() - started)
    return 1e6 * best / jobs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--host-provider", action="store_true")
    args = parser.parse_args()
    if args.host_provider:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())  # a host that traces, exporting nowhere
    tracing.configure("varco-producer", join_host=True)  # as Client.__init__ does
    print(f"opentelemetry.trace imported by the producer's graph: {'opentelemetry.trace' in sys.modules}")
    print(f"tracing on in this process: {tracing.on()}")
    bare, traced = per_job_us(args.jobs, False), per_job_us(args.jobs, True)
    print(f"{args.jobs} jobs: bare loop {bare:.3f} us/job, submit's tracing calls {traced:.3f} us/job, "
          f"cost {traced - bare:.3f} us/job")  # fmt: skip


if __name__ == "__main__":
    main()
