"""`varco demo` (what `make demo` runs) on a fresh directory: starts its own Redis and worker, all jobs succeed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers import VARCO_CLI

from varco.workers.devtools.local_redis import free_port


def test_demo_runs_every_task_type_and_cleans_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VARCO_")}
    env |= {"VARCO_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "COLUMNS": "200"}  # nothing there
    run = subprocess.run([*VARCO_CLI, "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "started a private redis-server" in out
    assert "16/16 succeeded" in out
    results = list((tmp_path / ".demo" / "results").glob("*.json"))
    assert len(results) == 16
