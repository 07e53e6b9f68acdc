"""A worker node that cannot serve says why and exits non-zero after a bounded number of tries."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers import VARCO_CLI

from varco.workers.node import exit_codes


def start_worker(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VARCO_CLI, "worker", "--gpus", "cpu", "--no-callbacks"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_model_that_never_loads_ends_the_worker_after_bounded_tries(worker_env: dict, tmp_path: Path) -> None:
    run = start_worker({**worker_env, "VARCO_MODEL": str(tmp_path / "no-such-model")}, tmp_path)
    assert run.returncode == 1
    log = run.stdout + run.stderr
    assert f"failed to load its model {exit_codes.MAX_LOAD_FAILURES} times in a row; giving up" in log
    assert log.count("could not load the model") == exit_codes.MAX_LOAD_FAILURES


def test_an_invalid_setting_ends_the_worker_at_once(worker_env: dict, tmp_path: Path) -> None:
    run = start_worker({**worker_env, "VARCO_ENGINE": "tensorrt"}, tmp_path)
    assert run.returncode == 1
    log = run.stdout + run.stderr
    assert "cannot start" in log and "engine" in log and "giving up" in log
    assert log.count("cannot start:") == 1  # not restarted
