"""The `varco` CLI against the running test worker, as a user would call it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import VARCO_CLI

from varco.producer import Client


def varco(
    env: dict[str, str], *args: str, stdin: str | None = None, columns: str = "200"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VARCO_CLI, *args],
        env={**os.environ, **env, "COLUMNS": columns}, input=stdin, capture_output=True, text=True, timeout=180,
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
    assert [r[4].split(":")[0] for r in rows] == ["-", "ImageDecodeError", "-"]  # the error column
    assert client.status(rows[2][2]).task == "vqa"  # plain ids, usable as they are
    assert "2 succeeded, 1 did not (3 submitted)" in run.stderr
    assert "1 not succeeded" in run.stderr and "3/3" in run.stderr  # the bar counts failures

    as_json = varco(worker_env, "submit", "--from", str(listing), "--task", "caption", "--wait", "--json")
    data = json.loads(as_json.stdout)
    assert [(d["line"], d["state"]) for d in data] == [(2, "succeeded"), (4, "failed"), (5, "succeeded")]
    assert data[1]["error"]["type"] == "ImageDecodeError"


def test_submit_prints_a_plain_id_that_other_commands_take(worker_env: dict[str, str], http_files) -> None:
    submitted = varco(worker_env, "submit", http_files.base + "/cat.png", "--task", "caption")
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
        ("submit", "--from", str(listing), "--task", "caption"): f"{listing}:4: ",  # the file's line, not an index
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


def records(client: Client) -> int:
    return sum(1 for _ in client.redis.scan_iter("varco:job:*"))


def test_every_bad_line_is_reported_on_one_line_each_and_nothing_is_submitted(
    worker_env: dict[str, str], client: Client, http_files, tmp_path: Path
) -> None:
    url = http_files.base + "/cat.png"
    listing = tmp_path / "bad.txt"
    question = "Which of the many, many objects in this long, long question is red? " * 2
    listing.write_text(
        f"{url}\n{{not json\n"
        + json.dumps({"image_uri": url, "task": "vqa"}) + "\n"
        + json.dumps({"image_uri": "gopher://x/y.png", "task": "vqa", "prompt": question}) + "\n"
        + f"{url}\n[1, 2]\n"
    )  # fmt: skip
    before = records(client)
    run = varco(worker_env, "submit", "--from", str(listing), "--task", "caption", columns="80")  # no terminal
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert [line.split(": ", 1)[0] for line in lines[:-1]] == [f"{listing}:{n}" for n in (2, 3, 4, 6)]
    assert "not JSON" in lines[0] and "needs a prompt" in lines[1] and "expected a JSON object" in lines[3]
    assert "unsupported URI scheme 'gopher'" in lines[2] and len(lines[2]) > 80  # one line, never wrapped
    assert lines[-1] == "4 bad line(s); nothing was submitted"
    assert records(client) == before and run.stdout == ""


def test_task_is_explicit(worker_env: dict[str, str], http_files, tmp_path: Path) -> None:
    url = http_files.base + "/cat.png"
    assert "required: caption | grounding" in varco(worker_env, "submit", "--help").stdout
    alone = varco(worker_env, "submit", url)
    assert alone.returncode == 2 and "--task is required: caption | grounding | referring | ocr | vqa" in alone.stderr
    listing = tmp_path / "tasks.txt"
    listing.write_text(f"{url}\n" + json.dumps({"image_uri": url, "task": "ocr"}) + "\n")
    run = varco(worker_env, "submit", "--from", str(listing))
    assert run.returncode == 2 and run.stderr.splitlines()[0].startswith(f"{listing}:1: no task: give --task")
    assert len(run.stderr.splitlines()) == 2  # line 2 names its own task


def test_an_idempotency_prefix_makes_a_rerun_submit_nothing_twice(
    worker_env: dict[str, str], client: Client, http_files, tmp_path: Path
) -> None:
    url = http_files.base + "/cat.png"
    listing = tmp_path / "again.txt"
    listing.write_text(f"{url}\n# skipped\n{url}\n" + json.dumps({"image_uri": url, "idempotency_key": "own"}) + "\n")
    prefix = f"run-{tmp_path.name}"
    first = varco(worker_env, "submit", "--from", str(listing), "--task", "caption", "--idempotency-prefix", prefix)
    assert first.returncode == 0, first.stderr
    before = records(client)
    again = varco(worker_env, "submit", "--from", str(listing), "--task", "caption", "--idempotency-prefix", prefix)
    assert again.stdout == first.stdout and len(set(first.stdout.split())) == 3
    assert records(client) == before  # nothing new
    assert client.redis.get(f"varco:idem:{prefix}:3") is not None  # the line number makes the key
    changed = varco(worker_env, "submit", "--from", str(listing), "--task", "ocr", "--idempotency-prefix", prefix)
    assert changed.returncode == 2 and f"{listing}:1: this idempotency key was first used" in changed.stderr


def test_results_writes_each_result_to_the_directory(
    worker_env: dict[str, str], client: Client, http_files, tmp_path: Path
) -> None:
    good = client.submit(http_files.base + "/cat.png", "ocr", max_new_tokens=1024)
    bad = client.submit(http_files.base + "/not-an-image.txt", "caption")
    out = tmp_path / "results"
    run = varco(worker_env, "results", good, bad, "-o", str(out), "--timeout", "60")
    assert run.returncode == 1, run.stderr  # one job failed
    rows = [line.split("\t") for line in run.stdout.splitlines()]
    assert rows[0] == [good, "succeeded", str(out / f"{good}.json"), "-"]
    assert rows[1][:3] == [bad, "failed", "-"] and rows[1][3].startswith("ImageDecodeError: ")
    assert json.loads((out / f"{good}.json").read_text())["output"]["ocr"][0]["text"] == "백범로"
    assert "1 of 2 results written" in run.stderr
    # --from takes submit's own output: plain ids, or the rows of --wait.
    listing = tmp_path / "submitted.txt"
    listing.write_text(run.stdout.splitlines()[0] + "\n" + good + "\n")
    again = varco(worker_env, "results", "--from", str(listing), "-o", str(tmp_path / "again"), "--json")
    assert again.returncode == 0 and [r["job_id"] for r in json.loads(again.stdout)] == [good]
