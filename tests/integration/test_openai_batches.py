"""The Batch API end to end, through the official `openai` SDK: `varco gateway` -> files in the result store
(S3) -> a batch -> the runner in the `varco worker` node's callback process -> jobs on the worker -> output
and error files read back with `files.content`."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
import openai
from conftest import GATEWAY_KEYS, IMAGES_BUCKET
from helpers import VARCO_CLI, ServedFiles, card_output
from openai.types import Batch

from varco.producer import Client

ALICE, BOB = GATEWAY_KEYS
CARD = {
    "caption": "Describe this image.",
    "grounding": "<gro>\nDescribe the image in detail.",
    "referring": "<obj>이 물건</obj><bbox>0.039, 0.138, 0.283, 0.257</bbox>은 어떻게 쓰는거야?",
    "ocr": "<ocr>",
}
ANSWERS = {"caption": "A red picture.", **{task: card_output(task) for task in ("grounding", "referring", "ocr")}}
ENDPOINT = "/v1/chat/completions"


@pytest.fixture
def api(gateway: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway + "/v1", api_key=ALICE, max_retries=0, timeout=120) as sdk:
        yield sdk


@pytest.fixture
def bob(gateway: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway + "/v1", api_key=BOB, max_retries=0, timeout=120) as sdk:
        yield sdk


def line(custom_id: str, text: str, url: str, **extra: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"model": "varco-vision", "messages": [{"role": "user", "content": content}], "max_tokens": 1024}
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body, **extra}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def finished(api: openai.OpenAI, batch_id: str, timeout: float = 180.0) -> Batch:
    give_up = time.monotonic() + timeout
    while (batch := api.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < give_up, f"batch still {batch.status}"
        time.sleep(0.5)
    return batch


def lines_of(api: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in api.files.content(file_id).text.splitlines()]


def test_a_batch_answers_every_line_once_and_a_bad_image_goes_to_the_error_file(
    api: openai.OpenAI, http_files: ServedFiles
) -> None:
    cat = http_files.base + "/cat.png"
    rows = [line(f"{task}-{n}", CARD[task], cat) for n in range(2) for task in sorted(CARD)]
    rows.insert(3, line("bad-image", "Describe this image.", http_files.base + "/not-an-image.txt"))
    uploaded = api.files.create(file=("requests.jsonl", jsonl(rows)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(rows))
    assert api.files.retrieve(uploaded.id).filename == "requests.jsonl"
    assert api.files.content(uploaded.id).content == jsonl(rows)

    batch = api.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h",
                               metadata={"run": "nightly"})  # fmt: skip
    assert batch.status == "validating" and batch.metadata == {"run": "nightly"}
    batch = finished(api, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (9, 8, 1)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    output, errors = lines_of(api, batch.output_file_id), lines_of(api, batch.error_file_id)
    assert sorted(x["custom_id"] for x in output + errors) == sorted(r["custom_id"] for r in rows)
    for answer in output:
        assert answer["error"] is None and answer["response"]["status_code"] == 200
        body = answer["response"]["body"]
        assert body["choices"][0]["message"]["content"] == ANSWERS[answer["custom_id"].split("-")[0]]
        assert body["varco"]["job_id"] == answer["response"]["request_id"]
    [bad] = errors
    assert bad["custom_id"] == "bad-image" and bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["code"] == "invalid_image"
    assert api.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in api.batches.list(limit=100)]


def test_a_malformed_file_fails_validation_naming_each_line(api: openai.OpenAI, http_files: ServedFiles) -> None:
    cat = http_files.base + "/cat.png"
    rows = [line("a", "<ocr>", cat), b"{not json", line("a", "<ocr>", cat),
            line("c", "<ocr>", cat) | {"url": "/v1/completions"}]  # fmt: skip
    uploaded = api.files.create(file=("bad.jsonl", jsonl(rows)), purpose="batch")
    batch = finished(api, api.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                             completion_window="24h").id)  # fmt: skip
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "invalid_json"),
        (3, "duplicate_custom_id"),
        (4, "invalid_url"),
    ]
    assert batch.output_file_id is None and batch.request_counts.total == 0


def test_a_cancelled_batch_stops_its_queued_lines_and_answers_each_line_once(
    api: openai.OpenAI, http_files: ServedFiles
) -> None:
    cat = http_files.base + "/cat.png"
    rows = [line(f"line-{n}", "<ocr>", cat) for n in range(60)]
    uploaded = api.files.create(file=("many.jsonl", jsonl(rows)), purpose="batch")
    batch = api.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h")
    cancelling = api.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    batch = finished(api, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    output, errors = lines_of(api, batch.output_file_id), lines_of(api, batch.error_file_id)
    assert sorted(x["custom_id"] for x in output + errors) == sorted(r["custom_id"] for r in rows)
    assert errors and all(x["error"]["code"] == "batch_cancelled" for x in errors)
    assert batch.request_counts.completed == len(output)


def test_another_keys_files_and_batches_are_not_found(
    api: openai.OpenAI, bob: openai.OpenAI, http_files: ServedFiles
) -> None:
    uploaded = api.files.create(file=("mine.jsonl", jsonl([line("x", "<ocr>", http_files.base + "/cat.png")])),
                                purpose="batch")  # fmt: skip
    batch = api.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h")
    for call in (
        lambda: bob.files.retrieve(uploaded.id),
        lambda: bob.files.content(uploaded.id),
        lambda: bob.files.delete(uploaded.id),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert uploaded.id not in [f.id for f in bob.files.list()]
    assert batch.id not in [b.id for b in bob.batches.list()]
    finished(api, batch.id)
    assert api.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(uploaded.id)


def varco(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VARCO_CLI, *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_the_shell_and_python_run_a_batch_from_s3_without_the_gateway(
    worker_env: dict[str, str], client: Client, s3, http_files: ServedFiles, tmp_path: Path
) -> None:
    cat = http_files.base + "/cat.png"
    rows = [line("ocr", "<ocr>", cat), line("bad", "<ocr>", http_files.base + "/not-an-image.txt")]
    s3.put_object(Bucket=IMAGES_BUCKET, Key="batches/in.jsonl", Body=jsonl(rows))
    submitted = varco(worker_env, "batch", "submit", f"s3://{IMAGES_BUCKET}/batches/in.jsonl", "--wait", "--json")
    assert submitted.returncode == 0, submitted.stderr
    batch = Batch.model_validate(json.loads(submitted.stdout))  # OpenAI's Batch object
    assert batch.status == "completed" and batch.request_counts.completed == 1
    status = varco(worker_env, "batch", "status", batch.id, "--json")
    assert json.loads(status.stdout)["output_file_id"] == batch.output_file_id
    out = tmp_path / "out.jsonl"
    written = varco(worker_env, "batch", "results", batch.id, "-o", str(out))
    assert written.returncode == 0, written.stderr
    answers = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert answers["ocr"]["response"]["body"]["choices"][0]["message"]["content"] == ANSWERS["ocr"]
    assert answers["bad"]["response"]["status_code"] == 400

    source = tmp_path / "local.jsonl"
    source.write_bytes(jsonl(rows[:1]))
    batch_id = client.submit_batch(source, metadata={"from": "python"})
    record = client.wait_batch(batch_id, timeout=180)
    assert record.status.value == "completed" and record.metadata == {"from": "python"}
    assert [json.loads(x)["custom_id"] for x in b"".join(client.batch_results(batch_id)).splitlines()] == ["ocr"]
