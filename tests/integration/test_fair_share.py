"""Tenants on a real Redis and a real worker (issue 19): a backlog does not starve others, weights share the
slots, a newcomer gets its share at once, priorities order a tenant's jobs, deadlines expire queued jobs
without inference, and admission limits hold under racing submitters, in Python and through the gateway.

Jobs that must stay queued are routed to a queue no worker consumes; a test then hands the worker one ticket
for that queue at a time (a ticket names its queue, not a job), so what runs next is decided by the fair
queue alone, never by timing.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import forced_tokens, node_metric, running_gateway, running_worker
from helpers import VARCO_CLI
from images import png

from varco.producer import Client, QueueFull
from varco.tasks.celery_app import INFER_QUEUE, INFER_TASK, queue_lanes
from varco.tasks.fair_queue import ticket_kwargs
from varco.tasks.schemas import JobStatus
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import LocalRedis, free_port, start_redis

WEIGHTS = "A=3,B=1"
LATE = png(36, 36, (7, 8, 9))  # the deadline test's image: no other job fetches it


@pytest.fixture(scope="module")
def fair_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with start_redis(tmp_path_factory.mktemp("redis-fair")) as server:
        yield server


@pytest.fixture(scope="module")
def fair_env(worker_env: dict[str, str], fair_redis: LocalRedis) -> dict[str, str]:
    return {**worker_env, "VARCO_BROKER_URL": fair_redis.url, "VARCO_TENANT_WEIGHTS": WEIGHTS,
            "VARCO_METRICS_PORT": str(free_port())}  # fmt: skip


@pytest.fixture(scope="module")
def fair_worker(fair_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with running_worker(fair_env, tmp_path_factory.mktemp("logs") / "fair-worker.log"):
        yield


@pytest.fixture(scope="module")
def fair(fair_env: dict[str, str], fair_worker: None) -> Iterator[Client]:
    with Client(settings_from_env(fair_env)) as client:
        yield client


@pytest.fixture(scope="module")
def cat(file_root: Path) -> str:
    return (file_root / "cat.png").as_uri()


def parked(client: Client, queue: str, **settings: object) -> Client:
    """A client whose captions go to `queue`, which no worker consumes."""
    return Client(client.settings.model_copy(update={"task_routes": {"caption": queue}, **settings}))


def hand_one_ticket(client: Client, queue: str) -> None:
    """Let the worker run one job of `queue`: a ticket for it, on the queue the worker consumes."""
    client.app.send_task(INFER_TASK, kwargs=ticket_kwargs(queue), task_id=uuid.uuid4().hex, queue=INFER_QUEUE)


def drop_tickets(client: Client, queue: str) -> None:
    client.redis.delete(*queue_lanes(queue))


def cancel_rest(client: Client, job_ids: list[str], tenant: str | None = None) -> None:
    """Cancel what is left; with `tenant`, wait until the worker's tickets have passed the cancelled jobs."""
    for job_id in job_ids:
        client.cancel(job_id)
    deadline = time.monotonic() + 120
    while tenant is not None and client.fair.depth(tenant):
        assert time.monotonic() < deadline, f"{client.fair.depth(tenant)} cancelled jobs of {tenant} still queued"
        time.sleep(0.1)


def first_finished(client: Client, job_ids: list[str], n: int) -> list[JobStatus]:
    finished = []
    for status in client.wait(job_ids, timeout=300):
        finished.append(status)
        if len(finished) == n:
            break
    return finished


def test_a_backlog_of_500_does_not_hold_back_another_tenants_jobs(fair: Client, cat: str) -> None:
    backlog = fair.submit_many([{"image_uri": cat, "task": "caption", "tenant": "bulk"}] * 500)
    try:
        for _ in range(5):  # one after another, as an interactive caller would
            job_id = fair.submit(cat, "caption", tenant="interactive")
            [status] = fair.wait(job_id, timeout=120)
            assert status.state.value == "succeeded" and status.tenant == "interactive"
            assert fair.fair.depth("bulk") > 250, "the interactive job waited for most of the backlog"
        assert fair.result(job_id).tenant == "interactive"
    finally:
        cancel_rest(fair, backlog, "bulk")


def test_weights_three_to_one_share_the_completions_within_five_points(fair: Client, cat: str) -> None:
    # One batch: both tenants' jobs are queued at once, before the first pick.
    jobs = [{"image_uri": cat, "task": "caption", "tenant": t} for t in ("A", "B") for _ in range(200)]
    job_ids = fair.submit_many(jobs)
    try:
        first_finished(fair, job_ids, 120)
    finally:
        cancel_rest(fair, job_ids, "A")
        cancel_rest(fair, [], "B")
    started = [s for s in fair.statuses.get_many(job_ids).values() if s and s.started_at]
    window = sorted(started, key=lambda s: s.started_at)[:100]  # type: ignore[arg-type, return-value]
    share = Counter(s.tenant for s in window)["A"] / len(window)
    assert 0.70 <= share <= 0.80, f"A's share of the first {len(window)} jobs started: {share:.2f}"


def test_a_new_tenant_mid_run_gets_its_share_without_a_restart(fair: Client, cat: str) -> None:
    backlog = fair.submit_many([{"image_uri": cat, "task": "caption", "tenant": "bulk"}] * 300)
    try:
        first_finished(fair, backlog, 20)  # the backlog is being worked on
        before = fair.fair.depth("bulk")
        newcomer = fair.submit_many([{"image_uri": cat, "task": "caption", "tenant": "newcomer"}] * 10)
        assert {s.state.value for s in fair.wait(newcomer, timeout=120)} == {"succeeded"}
        # Weights 1:1: while the newcomer's 10 jobs ran, the backlog had about 10 picks too, plus what the
        # worker's task threads took while the last of them finished; first in, first out, it would be all 270.
        assert before - fair.fair.depth("bulk") < 60
    finally:
        cancel_rest(fair, backlog, "bulk")


def test_priorities_still_order_jobs_within_a_tenant(fair: Client, cat: str) -> None:
    queue = "varco.parked-priority"
    with parked(fair, queue) as client:
        ids = {p: client.submit(cat, "caption", priority=p, tenant="P") for p in (0, 9, 4)}
        for expected in (9, 4, 0):
            hand_one_ticket(client, queue)
            [status] = client.wait(ids[expected], timeout=120)
            assert status.state.value == "succeeded"
            assert all(client.status(ids[p]).state.value == "queued" for p in ids if p < expected)
        drop_tickets(client, queue)


def test_a_deadline_that_passes_in_the_queue_fails_the_job_without_inference(
    fair: Client, fair_env: dict[str, str], http_files, receiver
) -> None:
    queue, path = "varco.parked-late", "/hook/late"
    url = http_files.add("/late.png", LATE)
    with parked(fair, queue) as client:
        job_id = client.submit(url, "caption", deadline_s=0.2, callback_url=receiver.url(path))
        time.sleep(0.5)  # past its deadline, still queued
        hand_one_ticket(client, queue)
        [status] = client.wait(job_id, timeout=60)
        drop_tickets(client, queue)
    assert status.state.value == "failed" and status.error is not None
    assert status.error.type == "DeadlineExceeded" and status.attempts == 0 and status.started_at is None
    assert http_files.routes["/late.png"].hits == 0 and forced_tokens(fair_env, LATE) == 0  # never fetched nor run
    assert node_metric(fair_env, "varco_jobs_expired_total", tenant="default") == 1
    got = receiver.wait_for(lambda got: any(r.path == path for r in got))
    [hook] = [r for r in got if r.path == path]
    assert b'"job.failed"' in hook.body and b"DeadlineExceeded" in hook.body


def test_sixteen_racing_submitters_never_pass_the_tenant_limit(
    fair: Client, fair_env: dict[str, str], cat: str
) -> None:
    queue, barrier = "varco.parked-admission", threading.Barrier(16)
    outcomes: list[str | QueueFull] = []
    with parked(fair, queue, max_queued_per_tenant=20) as client:

        def submit() -> None:
            barrier.wait()
            for _ in range(3):
                try:
                    outcomes.append(client.submit(cat, "caption", tenant="racer"))
                except QueueFull as exc:
                    outcomes.append(exc)

        threads = [threading.Thread(target=submit) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        admitted = [o for o in outcomes if isinstance(o, str)]
        refused = [o for o in outcomes if isinstance(o, QueueFull)]
        assert len(admitted) == 20 and len(refused) == 28 and client.fair.depth("racer") == 20
        assert {(e.limit, e.depth, e.tenant) for e in refused} == {(20, 20, "racer")}
        with pytest.raises(QueueFull):  # a batch is refused whole
            client.submit_many([{"image_uri": cat, "task": "caption", "tenant": "racer"}])
        assert client.submit(cat, "caption", tenant="someone-else")  # other tenants are not held back
        # The node's /metrics: queued and shed per tenant (unweighted tenants fold into `other`).
        assert node_metric(fair_env, "varco_tenant_queued", tenant="other") == 21
        assert node_metric(fair_env, "varco_jobs_shed_total", tenant="other") == 29
        # The share of GPU slots: rate() of the picks per tenant over the picks of all.
        assert node_metric(fair_env, "varco_fair_picks_total", tenant="A") > 0
        cancel_rest(client, admitted)
        drop_tickets(client, queue)


def test_the_gateway_refuses_over_the_limit_with_429_queue_full(
    fair_env: dict[str, str], fair_worker: None, tmp_path: Path
) -> None:
    env = {**fair_env, "VARCO_API_KEYS": "gw-racers:key-racers-0123456789", "VARCO_MAX_QUEUED_PER_TENANT": "10",
           "VARCO_TASK_ROUTES": '{"caption": "varco.parked-gateway"}'}  # fmt: skip
    barrier, answers = threading.Barrier(16), []
    with running_gateway(env, tmp_path / "gateway.log") as base:

        def post() -> None:
            with httpx.Client(base_url=base, headers={"Authorization": "Bearer key-racers-0123456789"}) as http:
                barrier.wait()
                answers.append(http.post("/v1/jobs", json={"image_uri": "https://x.example/a.png", "task": "caption"}))

        threads = [threading.Thread(target=post) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {202: 10, 429: 6}, statuses
    refused = [a for a in answers if a.status_code == 429]
    assert {a.json()["type"] for a in refused} == {"urn:varco:problem:queue-full"}
    assert all(int(a.headers["retry-after"]) > 0 for a in refused)
    with Client(settings_from_env(env)) as client:
        assert client.fair.depth("gw-racers") == 10
        cancel_rest(client, [a.json()["job_id"] for a in answers if a.status_code == 202])
        drop_tickets(client, "varco.parked-gateway")


def test_the_cli_submits_for_a_tenant_and_says_when_the_queue_is_full(fair_env: dict[str, str], fair: Client) -> None:
    env = {**os.environ, **fair_env, "VARCO_TASK_ROUTES": '{"caption": "varco.parked-cli"}',
           "VARCO_MAX_QUEUED_PER_TENANT": "1"}  # fmt: skip
    args = [*VARCO_CLI, "submit", "https://x.example/a.png", "--task", "caption",
            "--tenant", "cli-team", "--deadline-s", "600"]  # fmt: skip
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert fair.status(first.stdout.strip()).tenant == "cli-team"
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "queue full: tenant 'cli-team' has 1 jobs queued" in second.stderr
    assert "Traceback" not in second.stderr
    fair.cancel(first.stdout.strip())
    drop_tickets(fair, "varco.parked-cli")
