"""The `varco` CLI against the running test worker, as a user would call it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import VARCO_CLI

from varco.producer import Client


def varco(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VARCO_CLI, *args],
        env={**os.environ, **env, "COLUMNS": "200"}, input=stdin, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_submit_status_result(worker_env: dict[str, str], client: Client, http_files) -> None:
    url = http_files.base + "/cat.png"
    submitted = varco(worker_env, "submit", url, "--task", "grounding", "--max-new-tokens", "1024", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)
    result = varco(worker_env, "result", job_id, "--timeout", "60", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["job_id"] == job_id and data["output"]["objects"][0]["label"] == "two cats"
    status = json.loads(varco(worker_env, "status", job_id, "--json").stdout)
    assert status["state"] == "succeeded" and status["result_uri"].endswith(f"{job_id}.json")
    cancel = varco(worker_env, "cancel", job_id, "--json")
    assert cancel.returncode == 1 and json.loads(cancel.stdout) == {"job_id": job_id, "cancelled": False}


def test_submit_from_file_and_wait(worker_env: dict[str, str], client: Client, http_files, tmp_path: Path) -> None:
    url = http_files.base + "/cat.png"
    listing = tmp_path / "jobs.txt"
    listing.write_text(
        f"# one URI per line, or JSON\n{url}\n{url}\n"
        + json.dumps({"image_uri": url, "task": "vqa", "prompt": "Colour?"}) + "\n"
    )  # fmt: skip
    run = varco(worker_env, "submit", "--from", str(listing), "--task", "caption", "--wait", "--json")
    assert run.returncode == 0, run.stderr
    statuses = json.loads(run.stdout)
    assert len(statuses) == 3 and {s["state"] for s in statuses} == {"succeeded"}
    assert {s["task"] for s in statuses} == {"caption", "vqa"}
    assert "3/3" in run.stderr  # the progress bar


def test_bad_request_exit_code(worker_env: dict[str, str], http_files) -> None:
    run = varco(worker_env, "submit", http_files.base + "/cat.png", "--task", "vqa")
    assert run.returncode == 2 and "needs a prompt" in run.stderr
    missing = varco(worker_env, "status", "no-such-job")
    assert missing.returncode == 2 and "no such job" in missing.stderr
