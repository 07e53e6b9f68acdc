"""Tenants sharing one worker (issue 19): B's wait behind A's backlog, A's throughput, 3:1 shares, Redis cost.

Run: .venv/bin/python bench/fairness.py [--backlog 500] [--interactive 20] [--jobs 300]
One private redis-server, one `varco worker --gpus cpu` on the tiny offline model (VARCO_TENANT_WEIGHTS=A=3,B=1),
captions of one PNG via file://. Prints, from one run:
- B's p50/p95 wait (submit to start) for jobs submitted one after another, alone and behind A's backlog,
  and, for comparison, behind the same backlog sent as today's job messages (first in, first out);
- A's throughput alone (fair queue and today's messages, same worker) and while B is backlogged too;
- the realised shares of A and B while both are backlogged;
- Redis commands per job (INFO commandstats deltas, worker and client together), fair queue against today's.

"Today's" jobs are published as the job messages Client sent before tickets, which workers still run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import redis
from plain_png import plain_png

from varco.producer import Client
from varco.tasks.celery_app import INFER_QUEUE, INFER_TASK, broker_priority, queue_depth
from varco.tasks.requests import validate_request
from varco.tasks.settings import settings_from_env
from varco.tasks.status import now_iso
from varco.workers.devtools.local_redis import start_redis
from varco.workers.devtools.tiny_model import make_tiny_model


def submit_today(client: Client, uri: str, n: int, tenant: str) -> list[str]:
    """n jobs as today's Client sent them: a status record and one Celery message naming the job."""
    request = validate_request(image_uri=uri, task="caption", tenant=tenant).model_dump(mode="json", exclude_none=True)
    ids = []
    for _ in range(n):
        job_id = uuid.uuid4().hex
        client.statuses.create(job_id, "caption", tenant=tenant)
        client.app.send_task(INFER_TASK, args=[job_id, request], kwargs={"enqueued_at": now_iso()}, task_id=job_id,
                             queue=INFER_QUEUE, priority=broker_priority(None))  # fmt: skip
        ids.append(job_id)
    return ids


def waits_of(client: Client, ids: list[str]) -> list[float]:
    statuses = client.statuses.get_many(ids).values()
    return [(s.started_at - s.created_at).total_seconds() for s in statuses if s and s.started_at and s.created_at]


def one_after_another(client: Client, n: int, submit: Callable[[], str]) -> list[float]:
    """n jobs, each submitted once the one before has finished (an interactive caller); their waits."""
    ids = []
    for _ in range(n):
        ids.append(submit())
        next(client.wait(ids[-1], timeout=600))
    return waits_of(client, ids)


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def commands(r: redis.Redis) -> tuple[int, int]:
    """Commands Redis has run (all, and script calls: EVALSHA/EVAL), INFO itself left out."""
    stats = r.info("commandstats")
    scripts = sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"), scripts


def timed(client: Client, submit: Callable[[], list[str]]) -> tuple[float, tuple[int, int], list[str]]:
    """Submit, wait for every job; (seconds, Redis commands and script calls, ids)."""
    before, started = commands(client.redis), time.perf_counter()
    ids = submit()
    failed = [s for s in client.wait(ids, timeout=1800) if s.state.value != "succeeded"]
    assert not failed, f"{len(failed)} jobs did not succeed: {failed[0]}"
    after = commands(client.redis)
    return time.perf_counter() - started, (after[0] - before[0], after[1] - before[1]), ids


def drain(client: Client, ids: list[str]) -> None:
    """Cancel what is left, and let the worker consume the tickets left behind (they find nothing)."""
    for job_id in ids:
        client.cancel(job_id)
    while queue_depth(client.redis):
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlog", type=int, default=500, help="A's backlog behind which B submits")
    parser.add_argument("--interactive", type=int, default=20, help="B's jobs, one after another")
    parser.add_argument("--jobs", type=int, default=300, help="jobs per throughput run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = start_redis(root)
        images = root / "images"
        images.mkdir()
        (images / "a.png").write_bytes(plain_png((640, 480)))
        uri = (images / "a.png").as_uri()
        env = {
            "VARCO_BROKER_URL": server.url,
            "VARCO_MODEL": str(make_tiny_model(root / "model")),
            "VARCO_RESULT_STORE": (root / "results").as_uri() + "/",
            "VARCO_FILE_ROOT": str(images),
            "VARCO_MAX_NEW_TOKENS": "1",
            "VARCO_TENANT_WEIGHTS": "A=3,B=1",
            "VARCO_METRICS_PORT": "0",
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "varco.producer.cli", "worker", "--gpus", "cpu", "--no-callbacks"],
            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = Client(settings_from_env(env))
            warm_up = client.submit_many(
                [{"image_uri": uri, "task": "caption"}] * 50
            )  # the model is loaded, threads up
            list(client.wait(warm_up, timeout=600))
            n = args.jobs

            def a_today() -> list[str]:
                return submit_today(client, uri, n, "A")

            def a_fair() -> list[str]:
                return client.submit_many([{"image_uri": uri, "task": "caption", "tenant": "A"}] * n)

            # Alternated, twice, so a change in the machine's load shows as noise rather than as a difference.
            rounds = [(timed(client, a_today), timed(client, a_fair)) for _ in range(2)]
            today_cmds, fair_cmds = rounds[0][0][1], rounds[0][1][1]

            def b_fair() -> str:
                return client.submit(uri, "caption", tenant="B")

            def b_today() -> str:
                return submit_today(client, uri, 1, "B")[0]

            alone = one_after_another(client, args.interactive, b_fair)
            backlog = client.submit_many([{"image_uri": uri, "task": "caption", "tenant": "A"}] * args.backlog)
            behind = one_after_another(client, args.interactive, b_fair)
            drain(client, backlog)
            backlog = submit_today(client, uri, args.backlog, "A")
            behind_today = one_after_another(client, args.interactive, b_today)
            list(client.wait(backlog, timeout=1800))

            # Both backlogged, one batch. The window: completions 50 to n (steady state, both still queued).
            both = [{"image_uri": uri, "task": "caption", "tenant": t} for t in ("A", "B") for _ in range(n)]
            ids = client.submit_many(both)
            finished: list[tuple[float, str | None]] = []
            for status in client.wait(ids, timeout=1800):
                finished.append((time.perf_counter(), status.tenant))
                if len(finished) == n:
                    break
            drain(client, ids)
            window = finished[50:]
            window_s = window[-1][0] - finished[49][0]
            shares = Counter(tenant for _, tenant in window)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            server.stop()

    print("one CPU worker, tiny model, caption of a 640x480 PNG via file://, max_new_tokens=1, weights A=3 B=1")
    print(f"B's wait, submit to start, {args.interactive} jobs one after another (p50 / p95):")
    print(f"  alone:                                {p(alone, 0.5):7.3f}s / {p(alone, 0.95):7.3f}s")
    print(f"  behind A's {args.backlog}-job backlog, fair queue: {p(behind, 0.5):7.3f}s / {p(behind, 0.95):7.3f}s")
    print(f"  behind A's {args.backlog}-job backlog, today (FIFO): the first job waited {behind_today[0]:.3f}s, the "
          f"whole backlog; the others ran after it had drained ({p(behind_today[1:], 0.5):.3f}s / "
          f"{p(behind_today[1:], 0.95):.3f}s)")  # fmt: skip
    print(f"A's throughput, {n} jobs:")
    print(f"  alone, today's job messages: {', '.join(f'{n / today[0]:.1f}' for today, _ in rounds)} jobs/s")
    print(f"  alone, fair queue:           {', '.join(f'{n / fair[0]:.1f}' for _, fair in rounds)} jobs/s")
    print(f"  shared with B (3:1, both backlogged): {shares['A'] / window_s:6.1f} jobs/s "
          f"(all tenants {len(window) / window_s:.1f} jobs/s)")  # fmt: skip
    print(f"realised shares over completions 51-{n} with both backlogged: "
          f"A {shares['A'] / len(window):.1%}, B {shares['B'] / len(window):.1%} (weights: 75% / 25%)")  # fmt: skip
    print("Redis commands per job (worker and client; commands run inside Lua scripts count too):")
    print(f"  today's job messages: {today_cmds[0] / n:5.1f}, of them script calls {today_cmds[1] / n:4.1f}")
    print(f"  fair queue + tickets: {fair_cmds[0] / n:5.1f}, of them script calls {fair_cmds[1] / n:4.1f}")


if __name__ == "__main__":
    main()
