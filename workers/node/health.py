"""Liveness and readiness of a worker node: children write heartbeats, the supervisor judges them.

Each inference child runs a `Heartbeat` thread (`runtime/heartbeat.py`) that writes `health-{name}.json` into the node's
state directory every couple of seconds: whether its model is loaded, how many requests its engine
holds, and how long since the engine last made progress (a decode step). The supervisor's
`NodeHealth` reads those files: a node is live while every child's heartbeat is fresh and no engine
with pending work has been stuck longer than `VARCO_LIVENESS_STALL_S`; it is ready when every
child has loaded its model and the broker and the result store answer.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from varco.tasks.connections import redis_client
from varco.tasks.results_store import ResultStore, result_store
from varco.tasks.settings import Settings

log = logging.getLogger(__name__)

NODE_STATE_ENV = "VARCO_NODE_STATE_DIR"  # set by the supervisor for its children, not by users
HEARTBEAT_EVERY_S = 2.0
HEARTBEAT_STALE_S = 30.0  # a child whose heartbeat is older is hung (or gone)
PROBE_TIMEOUT_S = 3.0  # a Redis check behind /readyz and /metrics answers within the probe's own timeout


def state_file(directory: Path, name: str) -> Path:
    return directory / f"health-{name}.json"


@dataclass
class Verdict:
    ok: bool
    reasons: list[str]

    def body(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "failing", "reasons": self.reasons}


def judge_liveness(states: dict[str, dict[str, Any] | None], now: float, stall_s: float) -> Verdict:
    """`states`: each inference child's last heartbeat (None: none written yet)."""
    reasons = []
    for name, state in sorted(states.items()):
        if state is None:
            reasons.append(f"{name}: no heartbeat yet")
            continue
        age = now - state["heartbeat"]
        if age > HEARTBEAT_STALE_S:
            reasons.append(f"{name}: no heartbeat for {age:.0f}s")
        elif state["pending"] and state["progress_age_s"] > stall_s:
            reasons.append(
                f"{name}: {state['pending']} requests pending and no engine progress for {state['progress_age_s']:.0f}s"
            )
    return Verdict(not reasons, reasons)


class NodeHealth:
    """Supervisor side: /livez and /readyz answers for the node."""

    def __init__(self, directory: Path, children: Callable[[], list[str]], settings: Settings) -> None:
        self.directory = directory
        self.children = children  # names of the inference children now
        self.settings = settings
        self._redis = redis_client(settings, timeout_s=PROBE_TIMEOUT_S, retries=0, decode_responses=False)
        self._store: ResultStore | None = None
        self._store_checked: tuple[float, str | None] = (0.0, None)

    def states(self) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        for name in self.children():
            try:
                out[name] = json.loads(state_file(self.directory, name).read_text())
            except (OSError, ValueError):
                out[name] = None
        return out

    def liveness(self) -> Verdict:
        return judge_liveness(self.states(), time.time(), self.settings.liveness_stall_s)

    def readiness(self) -> Verdict:
        reasons = [f"{name}: model not loaded yet" for name, s in self.states().items() if not (s and s["loaded"])]
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            reasons.append(f"broker: {exc}")
        if (problem := self.store_problem()) is not None:
            reasons.append(f"result store: {problem}")
        return Verdict(not reasons, reasons)

    def store_problem(self, every_s: float = 10.0) -> str | None:
        """Write and delete a probe object (at most every `every_s`): the bucket exists and is writable."""
        checked_at, problem = self._store_checked
        if time.monotonic() - checked_at < every_s:
            return problem
        try:
            self._store = self._store or result_store(self.settings)
            self._store.probe(f".readyz-{uuid.uuid4().hex}")
            problem = None
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        self._store_checked = (time.monotonic(), problem)
        return problem
