"""`varco worker` nodes as subprocesses, stopped by a warm shutdown (demo, integration tests, benches)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

# The `varco` console script as a module run by this interpreter (works without the venv on PATH).
VARCO_CLI = [sys.executable, "-m", "varco.producer.cli"]


def stop_gracefully(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM (Celery's warm shutdown: in-flight jobs finish), then SIGKILL past `timeout_s`."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def local_worker(
    env: Mapping[str, str], log_path: Path, *args: str, stop_timeout_s: float = 60.0
) -> Iterator[subprocess.Popen]:
    """`varco worker --gpus cpu [args]` with `env` over this process's environment, logging to `log_path`."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*VARCO_CLI, "worker", "--gpus", "cpu", *args],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield process
    finally:
        stop_gracefully(process, stop_timeout_s)
