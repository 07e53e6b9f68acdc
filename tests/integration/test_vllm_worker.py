"""A worker started with VARCO_ENGINE=vllm serves the queue: every task type, cancel, a bad image.

It has its own Redis database, so the session's hf worker never takes its jobs.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    CAT,
    LONG,
    LONG_ANSWER_TOKENS,
    RESULTS_BUCKET,
    forced_tokens,
    running_worker,
    sha,
    submit_every_task,
)
from helpers import card_output

from varco.producer import Client, JobCancelled
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import LocalRedis, free_port


@pytest.fixture(scope="module")
def vllm_env(worker_env: dict[str, str], redis_server: LocalRedis, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {
        **worker_env,
        "VARCO_BROKER_URL": redis_server.url.rsplit("/", 1)[0] + "/1",
        "VARCO_ENGINE": "vllm",
        "VARCO_METRICS_PORT": str(free_port()),  # its own node endpoint: the cancel test reads it
        "VARCO_GPU_MEMORY_UTILIZATION": "0.1",  # of RAM, on CPU
        "VARCO_MAX_NUM_SEQS": "8",
        "VARCO_VLLM_ENGINE_ARGS": '{"enforce_eager": true}',  # no compile step: starts in seconds
        "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache")),
    }


@pytest.fixture(scope="module")
def vllm_worker(vllm_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    log_path = tmp_path_factory.mktemp("vllm-logs") / "worker.log"
    with running_worker(vllm_env, log_path) as process:
        yield process, log_path


@pytest.fixture(scope="module")
def vllm_client(vllm_env: dict, vllm_worker) -> Iterator[Client]:
    client = Client(settings_from_env(vllm_env))
    yield client
    client.close()


def test_every_task_type_through_the_vllm_engine(vllm_client: Client, vllm_worker, http_files, s3) -> None:
    url = http_files.base + "/cat.png"
    jobs = submit_every_task(vllm_client, url)
    finished = {s.job_id: s for s in vllm_client.wait(jobs.values(), timeout=300)}
    assert {s.state.value for s in finished.values()} == {"succeeded"}, finished
    results = {task: vllm_client.result(job_id) for task, job_id in jobs.items()}
    assert results["caption"].output.text == "A red picture."
    assert results["grounding"].output.raw == card_output("grounding")
    assert results["grounding"].output.objects[0].boxes_px == [(9, 51, 326, 478), (326, 26, 637, 378)]
    assert len(results["ocr"].output.ocr) == 16
    assert results["referring"].output.text == card_output("referring")
    assert results["vqa"].output.objects[0].label == "red"
    assert all(r.image.sha256 == sha(CAT) for r in results.values())
    assert all(r.usage.prompt_tokens > 100 for r in results.values())
    _, log_path = vllm_worker
    assert "loaded by the vllm engine" in log_path.read_text()


def test_cancel_aborts_a_running_vllm_request(vllm_client: Client, vllm_env: dict, http_files, s3) -> None:
    before = forced_tokens(vllm_env, LONG)
    url = http_files.add("/long.png", LONG)
    job_id = vllm_client.submit(url, "caption", max_new_tokens=LONG_ANSWER_TOKENS + 500)  # scripted, no EOS before
    deadline = time.monotonic() + 120
    while forced_tokens(vllm_env, LONG) == before:  # cancel once it is generating
        assert time.monotonic() < deadline, "the long job never started generating"
        time.sleep(0.05)
    assert vllm_client.cancel(job_id)
    with pytest.raises(JobCancelled):
        vllm_client.result(job_id, timeout=120)
    assert forced_tokens(vllm_env, LONG) - before < LONG_ANSWER_TOKENS  # aborted before the script's end
    listing = s3.list_objects_v2(Bucket=RESULTS_BUCKET, Prefix=f"jobs/{job_id}")
    assert listing.get("KeyCount", 0) == 0  # nothing written for a cancelled job
    # the engine keeps serving after the abort
    after = vllm_client.submit(http_files.base + "/cat.png", "caption")
    assert vllm_client.result(after, timeout=120).output.text == "A red picture."


def test_an_unreadable_image_fails_alone_and_the_vllm_worker_keeps_serving(vllm_client: Client, http_files) -> None:
    bad = vllm_client.submit(http_files.base + "/not-an-image.txt", "caption")
    good = vllm_client.submit(http_files.base + "/cat.png", "ocr", max_new_tokens=1024)
    statuses = {s.job_id: s for s in vllm_client.wait([bad, good], timeout=120)}
    assert statuses[bad].state.value == "failed" and statuses[bad].error.type == "ImageDecodeError"
    assert statuses[good].state.value == "succeeded"
