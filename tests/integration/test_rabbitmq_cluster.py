"""The RabbitMQ fault test (docs/brokers.md): a 3-node cluster on loopback, a worker reaching it through
Celery's failover list, 300 jobs in flight, and the node leading the job queue killed -9 mid-run. Every job
ends succeeded, and each ran once."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest
from conftest import CAT
from helpers import VARCO_CLI

from varco.producer import Client
from varco.tasks.keys import INFER_QUEUE
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_rabbitmq import LocalRabbitMQ, start_cluster
from varco.workers.devtools.local_redis import start_redis

JOBS = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalRabbitMQ]]:
    nodes = start_cluster(tmp_path_factory.mktemp("rabbitmq-cluster"))
    yield nodes
    for node in nodes:
        node.stop()


def leader_of(nodes: list[LocalRabbitMQ], queue: str) -> LocalRabbitMQ:
    rows = nodes[0].ctl("list_queues", "name", "leader", "--no-table-headers").splitlines()
    [leader] = [row.split("\t")[1] for row in rows if row.split("\t")[0] == queue]
    [node] = [node for node in nodes if node.nodename == leader]
    return node


def test_killing_the_job_queue_leader_mid_run_loses_no_job_and_runs_none_twice(
    cluster: list[LocalRabbitMQ], worker_env: dict[str, str], http_files, tmp_path_factory: pytest.TempPathFactory
) -> None:
    logs = tmp_path_factory.mktemp("cluster-logs")
    with start_redis(tmp_path_factory.mktemp("redis-cluster")) as status_redis:
        env = {**worker_env, "VARCO_BROKER_URL": ";".join(node.url for node in cluster),
               "VARCO_STATUS_URL": status_redis.url, "VARCO_VISIBILITY_TIMEOUT": "10"}  # fmt: skip
        with Client(settings_from_env(env)) as client, open(logs / "worker.log", "w") as log:
            image = http_files.add("/cluster-cat.png", CAT)
            jobs = client.submit_many([{"image_uri": image, "task": "caption"}] * JOBS)
            worker = subprocess.Popen([*VARCO_CLI, "worker", "--gpus", "cpu", "--no-callbacks"],
                                      env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            try:
                finished = []
                for status in client.wait(jobs, timeout=600):  # mid-run: some done, most still queued
                    finished.append(status)
                    if len(finished) == 20:
                        break
                leader = leader_of(cluster, INFER_QUEUE)
                leader.kill()
                left = [job for job in jobs if job not in {s.job_id for s in finished}]
                finished += client.wait(left, timeout=900)
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=120)
                if os.environ.get("VARCO_SHOW_WORKER_LOG"):
                    print((logs / "worker.log").read_text())
    assert len(finished) == JOBS and {s.job_id for s in finished} == set(jobs)
    assert {s.state.value for s in finished} == {"succeeded"}, [s for s in finished if s.state.value != "succeeded"]
    assert {s.attempts for s in finished} == {1}  # none ran twice
