"""`Client.wait` follows the events channel and reads the records only when events may have been missed
(issue 24: it read every pending record once a second before): an end published while its subscription was
down still ends the wait, at once, not at the next periodic read."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from varco.producer import Client
from varco.producer import client as client_module
from varco.tasks.schemas import JobState
from varco.tasks.settings import Settings
from varco.tasks.status import EVENTS_CHANNEL
from varco.tasks.waiting import WaitPlan
from varco.workers.devtools.local_redis import start_redis

URL = "https://cdn.example.com/cat.jpg"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    with start_redis(tmp_path) as server, Client(Settings(broker_url=server.url, _env_file=None)) as c:
        yield c


def subscribers(client: Client) -> int:
    return client.redis.pubsub_numsub(EVENTS_CHANNEL)[0][1]


def test_an_end_published_while_the_subscription_was_down_still_ends_the_wait(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No periodic re-read within the test: only the reconnect (or outage) path can find the end.
    monkeypatch.setattr(client_module, "WaitPlan", functools.partial(WaitPlan, reread_s=3600.0))
    job_id = client.submit(URL, "caption")
    ended: list[JobState] = []
    waiter = threading.Thread(target=lambda: ended.extend(s.state for s in client.wait(job_id)), daemon=True)
    waiter.start()
    deadline = time.monotonic() + 30
    while subscribers(client) == 0:
        assert time.monotonic() < deadline, "the wait never subscribed"
        time.sleep(0.02)
    client.redis.client_kill_filter(_type="pubsub")  # the subscription drops; redis-py will reconnect it
    assert subscribers(client) == 0
    assert client.statuses.request_cancel(job_id) is JobState.CANCELLED  # published to nobody
    waiter.join(timeout=30)
    assert ended == [JobState.CANCELLED]


def test_a_wait_reads_each_pending_record_once_while_events_flow(client: Client) -> None:
    jobs = [client.submit(URL, "caption") for _ in range(5)]
    client.redis.config_resetstat()
    waiter = threading.Thread(target=lambda: list(client.wait(jobs, timeout=60)), daemon=True)
    waiter.start()
    deadline = time.monotonic() + 30
    while subscribers(client) == 0:
        assert time.monotonic() < deadline, "the wait never subscribed"
        time.sleep(0.02)
    time.sleep(2.5)  # what the wait does while nothing happens: before issue 24, a read of every record a second
    stats = client.redis.info("commandstats")
    reads = {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("mget", "get", "hgetall")}
    assert reads == {"mget": 1, "get": 0, "hgetall": 0}  # the wait's first read, all records in one, none since
    for job_id in jobs:
        client.statuses.request_cancel(job_id)
    waiter.join(timeout=30)
    assert not waiter.is_alive()  # the ends came as events
