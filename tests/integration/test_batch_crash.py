"""A 2,000-line batch survives kill -9 of its runner mid-expansion and again mid-finalization: every
custom_id comes back exactly once across the output and error files, and each line ran as one job, once.

The runners are `varco worker` nodes' callback processes (`python -m varco.workers.runtime.main --callbacks`),
on a Redis and a result directory of their own. The kill points are reached by state, not by timing: a full
queue (VARCO_MAX_QUEUED, no inference worker yet) holds expansion at 500 lines, and a result moved out of the
store holds finalization at the part that needs it while the runner retries the read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("openai")
from conftest import CAT
from helpers import ServedFiles

from varco.producer import Client
from varco.producer.batch_runner import FINAL_PART
from varco.tasks import keys
from varco.tasks.batches import BatchStore
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.devtools.local_worker import local_worker

LINES = 2000
MAX_QUEUED = 500
HELD = 1300  # the line whose result is away while finalization reaches it (in the third part)


@pytest.fixture
def held_image() -> Iterator[tuple[str, threading.Event]]:
    """An image URL whose answer waits until the event is set: the last line's job cannot end before."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            release.wait(300)
            self.send_response(200)
            self.send_header("content-length", str(len(CAT)))
            self.end_headers()
            self.wfile.write(CAT)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/held.png", release
    finally:
        release.set()
        server.shutdown()


def until(check: Callable[[], bool], what: str, timeout: float = 600.0) -> None:
    started = give_up = time.monotonic()
    give_up += timeout
    while not check():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.1)
    print(f"{what}: {time.monotonic() - started:.1f}s")


def runner(env: dict[str, str], name: str, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "varco.workers.runtime.main", "--callbacks", "--hostname", f"callbacks@{name}"]
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT)


def kill9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.timeout(900)
def test_a_batch_survives_kill_9_of_its_runner_mid_expansion_and_mid_finalization(
    worker_env: dict[str, str], http_files: ServedFiles, held_image: tuple[str, threading.Event], tmp_path: Path
) -> None:
    redis_server = start_redis()
    store = tmp_path / "results"
    env = {**worker_env, "VARCO_BROKER_URL": redis_server.url, "VARCO_RESULT_STORE": store.as_uri() + "/",
           "VARCO_MAX_QUEUED": str(MAX_QUEUED), "VARCO_BATCH_LEASE_S": "2", "VARCO_BATCH_POLL_S": "0.2",
           "VARCO_RESULT_CACHE_TTL": "3600", "VARCO_FETCH_TIMEOUT_S": "300", "VARCO_STORE_RETRY_S": "600",
           "VARCO_MAX_BATCH_SIZE": "16", "VARCO_METRICS_PORT": str(free_port())}  # fmt: skip
    held_url, release = held_image
    client = Client(settings_from_env(env))
    batches = BatchStore(client.redis, 3600)
    rows = []
    for n in range(1, LINES + 1):
        url = held_url if n == LINES else http_files.base + "/cat.png"
        content = [{"type": "text", "text": "<ocr>"}, {"type": "image_url", "image_url": {"url": url}}]
        body = {"model": "varco-vision", "messages": [{"role": "user", "content": content}]}
        rows.append({"custom_id": f"req-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    source = tmp_path / "batch.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    processes: list[subprocess.Popen] = []
    nodes = ExitStack()
    try:
        batch_id = client.submit_batch(source)
        record = lambda: client.batch(batch_id)  # noqa: E731

        # 1. Mid-expansion: no inference worker, so the queue fills at 500 lines and expansion waits there.
        first = runner(env, "a", tmp_path / "runner-a.log")
        processes.append(first)
        until(lambda: record().expanded == MAX_QUEUED, "expansion to reach the queue's limit")
        kill9(first)
        assert record().status.value == "in_progress" and record().expanded == MAX_QUEUED

        # 2. Another node: an inference worker and a runner, which takes the batch over when the lease ends.
        nodes.enter_context(local_worker(env, tmp_path / "worker.log", "--no-callbacks"))
        second = runner(env, "b", tmp_path / "runner-b.log")
        processes.append(second)
        until(lambda: record().expanded == LINES, "the second runner to expand every line")
        held_job = batches.job_ids(batch_id, HELD - 1, HELD)[0]
        until(lambda: client.status(held_job).state.value == "succeeded", f"line {HELD}'s job")
        result = store / f"{held_job}.json"
        away = result.rename(tmp_path / "away.json")

        # 3. Mid-finalization: the last line ends, finalization writes two parts and waits for line HELD's result.
        release.set()
        until(lambda: record().finalized == 2 * FINAL_PART and record().status.value == "finalizing",
              "finalization to reach the missing result")  # fmt: skip
        kill9(second)
        away.rename(result)
        third = runner(env, "c", tmp_path / "runner-c.log")
        processes.append(third)
        until(lambda: record().status.value == "completed", "the third runner to complete the batch")

        final = record()
        output = b"".join(client.batches.content(client.batches.file(final.output_file_id))).splitlines()
        errors = final.error_file_id and b"".join(client.batches.content(client.batches.file(final.error_file_id)))
        answers = [json.loads(x) for x in output] + [json.loads(x) for x in (errors or b"").splitlines()]
        assert sorted(a["custom_id"] for a in answers) == sorted(r["custom_id"] for r in rows)  # each exactly once
        assert [a for a in answers if a["error"] is not None][:3] == []
        assert all(a["response"]["status_code"] == 200 for a in answers)
        # Each line ran as one job, once: one status record per line, each run once, one result each.
        job_ids = batches.job_ids(batch_id, 0, LINES)
        assert len(set(job_ids)) == LINES == len(list(client.redis.scan_iter(match=keys.JOB_PREFIX + "*", count=1000)))
        statuses = client.statuses.get_many(job_ids)
        assert {s.attempts for s in statuses.values() if s is not None} == {1} and None not in statuses.values()
        assert len(list(store.glob("*.json"))) == LINES  # no job beyond the lines ran (the worker wrote 2,410
        # results while the orphan check read statuses before the fair queue: jobs that ran were taken for orphans)
        assert {a["response"]["request_id"] for a in answers} == set(job_ids)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        nodes.close()
        client.close()
        redis_server.stop()
