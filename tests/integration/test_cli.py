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
    bad_image = http_files.base + "/not-an-image.txt"
    listing = tmp_path / "jobs.txt"
    listing.write_text(
        f"# one URI per line, or JSON\n{url}\n\n{bad_image}\n"
        + json.dumps({"image_uri": url, "task": "vqa", "prompt": "Colour?"}) + "\n"
    )  # fmt: skip
    run = varco(worker_env, "submit", "--from", str(listing), "--task", "caption", "--wait")
    assert run.returncode == 1, run.stderr  # one input failed
    rows = [line.split("\t") for line in run.stdout.splitlines()]
    assert [(r[0], r[1], r[3]) for r in rows] == [("2", url, "succeeded"), ("4", bad_image, "failed"),
                                                  ("5", url, "succeeded")]  # fmt: skip
    assert client.status(rows[2][2]).task == "vqa"  # plain ids, usable as they are
    assert "2 succeeded, 1 did not (3 submitted)" in run.stderr
    assert "1 not succeeded" in run.stderr and "3/3" in run.stderr  # the bar counts failures

    as_json = varco(worker_env, "submit", "--from", str(listing), "--wait", "--json")
    data = json.loads(as_json.stdout)
    assert [(d["line"], d["state"]) for d in data] == [(2, "succeeded"), (4, "failed"), (5, "succeeded")]
    assert data[1]["error"]["type"] == "ImageDecodeError"


def test_submit_prints_a_plain_id_that_other_commands_take(worker_env: dict[str, str], http_files) -> None:
    submitted = varco(worker_env, "submit", http_files.base + "/cat.png")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id and '"' not in job_id and "\n" not in job_id
    assert varco(worker_env, "result", job_id, "--timeout", "60").returncode == 0


def test_bad_arguments_get_one_line_and_exit_code_2(worker_env: dict[str, str], http_files, tmp_path: Path) -> None:
    url = http_files.base + "/cat.png"
    listing = tmp_path / "jobs.txt"
    listing.write_text(f"{url}\n# a comment\n{url}\n" + json.dumps({"image_uri": url, "task": "vqa"}) + "\n")
    cases = {
        ("submit", url, "--metadata", "{bad"): "--metadata is not JSON",
        ("submit", "--from", str(tmp_path / "missing.txt")): "missing.txt: cannot read it",
        ("submit", url, "--region", "a,b"): "--region takes x1,y1,x2,y2",
        ("submit",): "give an IMAGE_URI or --from FILE",
        ("submit", "--from", str(listing)): f"{listing}:4: ",  # the file's line, not a request index
        ("submit", url, "--task", "vqa"): "needs a prompt",
    }
    for argv, message in cases.items():
        run = varco(worker_env, *argv)
        assert run.returncode == 2, (argv, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr, (argv, run.stderr)
        assert "request #" not in run.stderr, run.stderr


def test_bad_request_exit_code(worker_env: dict[str, str], http_files) -> None:
    run = varco(worker_env, "submit", http_files.base + "/cat.png", "--task", "vqa")
    assert run.returncode == 2 and "needs a prompt" in run.stderr
    missing = varco(worker_env, "status", "no-such-job")
    assert missing.returncode == 2 and "no such job" in missing.stderr
