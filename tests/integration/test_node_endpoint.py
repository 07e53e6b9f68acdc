"""A worker node's /metrics, /livez and /readyz, scraped over HTTP from a live `varco worker`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import running_worker
from prometheus_client.parser import text_string_to_metric_families

from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import LocalRedis, free_port
from varco.workers.node.health import HEARTBEAT_STALE_S, judge_liveness


def node_env(worker_env: dict, redis_server: LocalRedis, db: int, **extra: str) -> dict[str, str]:
    """A node of its own: its own Redis database (no other worker takes its jobs) and metrics port."""
    return {
        **worker_env,
        "VARCO_BROKER_URL": redis_server.url.rsplit("/", 1)[0] + f"/{db}",
        "VARCO_METRICS_PORT": str(free_port()),
        **extra,
    }


@pytest.fixture(scope="module")
def node(worker_env: dict, redis_server: LocalRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    env = node_env(worker_env, redis_server, 2)
    with running_worker(env, tmp_path_factory.mktemp("node") / "worker.log"):
        yield env


def base(env: dict) -> str:
    return f"http://127.0.0.1:{env['VARCO_METRICS_PORT']}"


def wait_http(url: str, ok: callable, timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=5)
            if ok(last):
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered as expected; last: {last and last.text}")


def scrape(env: dict) -> dict[tuple[str, tuple], float]:
    text = httpx.get(base(env) + "/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_ran(node: dict, http_files, receiver) -> None:
    client = Client(settings_from_env(node))
    try:
        wait_http(base(node) + "/readyz", lambda r: r.status_code == 200)
        url = http_files.base + "/cat.png"
        good = [client.submit(url, "ocr", max_new_tokens=1024) for _ in range(3)]
        good.append(client.submit(url, "caption", callback_url=receiver.url("/hook/metrics")))
        bad = client.submit(http_files.base + "/not-an-image.txt", "caption")
        states = {s.job_id: s.state.value for s in client.wait([*good, bad], timeout=120)}
        assert [states[j] for j in good] == ["succeeded"] * 4 and states[bad] == "failed"
        results = [client.result(j) for j in good]
        receiver.wait_for(lambda got: sum(r.path == "/hook/metrics" for r in got) >= 2)

        deadline = time.monotonic() + 30  # the webhook process counts its deliveries after answering
        while True:
            m = scrape(node)
            if value(m, "varco_callback_deliveries_total", outcome="delivered") >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert value(m, "varco_jobs_total", task="ocr", state="succeeded") == 3
        assert value(m, "varco_jobs_total", task="caption", state="succeeded") == 1
        assert value(m, "varco_jobs_total", task="caption", state="failed") == 1
        assert value(m, "varco_tokens_total", kind="output") == sum(r.usage.output_tokens for r in results)
        assert value(m, "varco_tokens_total", kind="prompt") == sum(r.usage.prompt_tokens for r in results)
        for phase in ("queue", "fetch", "inference", "store"):
            assert value(m, "varco_job_duration_seconds_count", task="ocr", phase=phase) == 3, phase
        # Submit to stored result overlaps the phases: its own metric, so summing the phases counts no time twice.
        assert value(m, "varco_job_duration_seconds_count", task="ocr", phase="total") == 0
        assert value(m, "varco_job_total_seconds_count", task="ocr") == 3
        processes = {labels for name, labels in m if name == "process_resident_memory_bytes"}
        assert len(processes) == 3  # the supervisor, the inference process and the callback process
        assert value(m, "varco_batch_size_sum") == 4  # every generated request counted once
        assert value(m, "varco_engine_busy_seconds_total") > 0
        assert value(m, "varco_callback_deliveries_total", outcome="delivered") == 2  # started + succeeded
        assert value(m, "varco_queue_length", queue="varco") == 0
        live = httpx.get(base(node) + "/livez", timeout=5)
        assert live.status_code == 200 and live.json() == {"status": "ok", "reasons": []}
    finally:
        client.close()


def test_readyz_fails_with_the_reason_when_the_bucket_is_missing(
    worker_env: dict, redis_server: LocalRedis, tmp_path: Path
) -> None:
    env = node_env(worker_env, redis_server, 3, VARCO_RESULT_STORE="s3://no-such-bucket/jobs/")
    with running_worker(env, tmp_path / "worker.log"):
        ready = wait_http(
            base(env) + "/readyz",
            lambda r: r.status_code == 503 and not any("not loaded" in x for x in r.json()["reasons"]),
        )
        assert any(r.startswith("result store:") and "NoSuchBucket" in r for r in ready.json()["reasons"])
        assert httpx.get(base(env) + "/livez", timeout=5).status_code == 200  # alive, just not ready


def test_liveness_judges_heartbeats_and_stalled_engines() -> None:
    now = 1000.0
    fresh = {"heartbeat": now - 1, "loaded": True, "pending": 0, "progress_age_s": 0.0}
    assert judge_liveness({"gpu0": fresh}, now, stall_s=300).ok
    busy = {**fresh, "pending": 3, "progress_age_s": 12.0}
    assert judge_liveness({"gpu0": busy}, now, stall_s=300).ok  # working, just slow
    stuck = {**fresh, "pending": 3, "progress_age_s": 301.0}
    verdict = judge_liveness({"gpu0": fresh, "gpu1": stuck}, now, stall_s=300)
    assert not verdict.ok and verdict.reasons == ["gpu1: 3 requests pending and no engine progress for 301s"]
    hung = {**fresh, "heartbeat": now - HEARTBEAT_STALE_S - 1}
    assert not judge_liveness({"gpu0": hung}, now, stall_s=300).ok
    assert not judge_liveness({"gpu0": None}, now, stall_s=300).ok
    idle_for_long = {**fresh, "pending": 0, "progress_age_s": 0.0}  # nothing to do is not stuck
    assert judge_liveness({"gpu0": idle_for_long}, now, stall_s=1).ok
