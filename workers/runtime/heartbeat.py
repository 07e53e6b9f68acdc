"""The inference child's heartbeat: its engine's state, written for the node's supervisor to judge.

The file's place and format are the node's contract (`node/health.py`); this side only writes it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from varco.workers.node.health import HEARTBEAT_EVERY_S, state_file

log = logging.getLogger(__name__)


class Heartbeat:
    """Child side: writes this process's state for the supervisor, atomically, until the process ends."""

    def __init__(self, directory: Path, name: str, state: Callable[[], dict[str, Any]]) -> None:
        self.path = state_file(directory, name)
        self.state = state
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        data = {**self.state(), "pid": os.getpid(), "heartbeat": time.time()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_EVERY_S)
            try:
                self.beat()
            except Exception:  # a full disk must not kill the worker; the stale heartbeat will show
                log.exception("could not write the heartbeat")


def engine_state(engine: Any | None) -> dict[str, Any]:
    """What a child reports: loaded or not, pending requests, seconds since the engine's last progress."""
    if engine is None:
        return {"loaded": False, "pending": 0, "progress_age_s": 0.0}
    pending = engine.pending()
    age = time.monotonic() - engine.last_progress if pending else 0.0
    return {"loaded": True, "pending": pending, "progress_age_s": round(age, 3)}
