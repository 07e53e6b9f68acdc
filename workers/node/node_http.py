"""The node's HTTP endpoint, served by the supervisor: /metrics (all children added up), /livez, /readyz."""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from varco.tasks.brokers import BROKER_ERRORS
from varco.tasks.celery_app import queue_depth
from varco.tasks.fair_queue import FairQueue
from varco.tasks.tenants import metric_label
from varco.workers.node.health import NodeHealth, Verdict

log = logging.getLogger("varco.supervisor")


class QueueLengthCollector:
    """varco_queue_length{queue}: jobs waiting, all priority lanes summed (read from the broker at scrape time)."""

    def __init__(self, depth: Callable[[str], int], queues: Iterable[str]) -> None:
        self.depth = depth
        self.queues = list(queues)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("varco_queue_length", "Jobs waiting, all priority lanes", labels=["queue"])
        try:
            for queue in self.queues:
                family.add_metric([queue], self.depth(queue))
        except (redis.RedisError, OSError, *BROKER_ERRORS) as exc:
            log.warning("queue length not readable: %r", exc)
        yield family


class NodeProcessCollector:
    """The standard `process_*` metrics (CPU seconds, resident memory, open fds, start time) of each of the
    node's processes, labelled `process` (supervisor, gpu0@host, callbacks@host…): multiprocess mode has
    no process metrics of its own, and a child's memory is what an operator watches."""

    def __init__(self, pids: Callable[[], Mapping[str, int]]) -> None:
        self.pids = pids

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for name, pid in self.pids().items():
            # A process that has just exited reads as nothing (ProcessCollector skips what /proc lacks).
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "process": name}, sample.value)
        yield from families.values()


class TenantCollector:
    """varco_tenant_queued{tenant} and varco_jobs_shed_total{tenant}, read from the fair queue at scrape time
    (every producer's refusals and every tenant's queued jobs, not only this node's); tenants bounded as
    tasks/tenants.metric_label says."""

    def __init__(self, client: redis.Redis, weights: Mapping[str, float]) -> None:
        self.fair, self.weights = FairQueue(client), dict(weights)

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        queued = GaugeMetricFamily("varco_tenant_queued", "Jobs queued per tenant, not yet picked", labels=["tenant"])
        shed = CounterMetricFamily("varco_jobs_shed", "Jobs refused by the queued-job limits", labels=["tenant"])
        try:
            for family, counts in ((queued, self.fair.depths()), (shed, self.fair.shed())):
                folded: Counter[str] = Counter()
                for tenant, n in counts.items():
                    folded[metric_label(tenant, self.weights)] += n
                for label, n in sorted(folded.items()):
                    family.add_metric([label], n)
        except redis.RedisError as exc:
            log.warning("tenant figures not readable: %r", exc)
        yield queued
        yield shed


def serve(
    port: int, state_dir: Path, health: NodeHealth, client: redis.Redis, queues: Iterable[str],
    weights: Mapping[str, float] | None = None,
    *, host: str = "0.0.0.0", pids: Callable[[], Mapping[str, int]] | None = None,
    depth: Callable[[str], int] | None = None,
) -> ThreadingHTTPServer:  # fmt: skip
    """Start the endpoint on a daemon thread at `host:port` (VARCO_METRICS_HOST, VARCO_METRICS_PORT); raises
    OSError if the port is taken. `pids` names the node's living processes for their `process_*` metrics;
    `depth` reads a queue's length from the broker (default: kombu's lists on `client`)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(state_dir))
    registry.register(QueueLengthCollector(depth or functools.partial(queue_depth, client), queues))
    registry.register(NodeProcessCollector(pids or (lambda: {"supervisor": os.getpid()})))
    registry.register(TenantCollector(client, weights or {}))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/livez", "/readyz"):
                verdict: Verdict = health.liveness() if path == "/livez" else health.readiness()
                body = json.dumps(verdict.body()).encode()
                self._send(200 if verdict.ok else 503, body, "application/json")
            else:
                self._send(404, b'{"error": "not found"}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: keep logs quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    # A short poll: the supervisor's `shutdown()` waits up to one interval, and every node stop pays it.
    serve = functools.partial(server.serve_forever, poll_interval=0.1)
    threading.Thread(target=serve, name="node-http", daemon=True).start()
    log.info("serving /metrics, /livez and /readyz on %s:%d", host, port)
    return server
