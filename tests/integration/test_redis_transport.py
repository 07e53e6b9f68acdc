"""The Redis transport (tasks/redis_transport.py) on a real redis-server: one command to record a delivery,
one to forget it, and every unacknowledged message (its own layout or stock kombu's) restored exactly once."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
import redis
from kombu.transport import pyamqp

from varco.tasks import redis_transport
from varco.tasks.celery_app import create_app
from varco.tasks.keys import UNACKED_HASH, UNACKED_INDEX, UNACKED_MESSAGES
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import LocalRedis, start_redis
from varco.workers.runtime.leases import LeaseKeeper

QUEUE = "varco.transport-test"

# Takes one message without acking it and dies without any clean-up (a worker killed -9 mid-job), through
# the app's connection or, with "stock", a plain kombu Connection (a worker not upgraded yet).
TAKE_AND_DIE = """
import os, sys
import kombu
from varco.tasks.celery_app import create_app
from varco.tasks.settings import Settings
app = create_app(Settings(broker_url=sys.argv[1], visibility_timeout=10, _env_file=None))
conn = app.connection_for_read()
if sys.argv[3] == "stock":
    conn = kombu.Connection(sys.argv[1], transport_options=app.conf.broker_transport_options)
message = conn.SimpleQueue(sys.argv[2]).get(timeout=10)
assert message is not None
os._exit(0)
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalRedis]:
    with start_redis(tmp_path) as server:
        yield server


def settings(url: str) -> Settings:
    return Settings(broker_url=url, visibility_timeout=10, _env_file=None)


def command_counts(raw: redis.Redis) -> dict[str, int]:
    stats = raw.info("commandstats")
    return {name.removeprefix("cmdstat_").upper(): int(value["calls"]) for name, value in stats.items()}


def test_a_delivery_and_its_ack_cost_one_zadd_and_one_zrem(server: LocalRedis) -> None:
    raw = redis.Redis.from_url(server.url)
    with create_app(settings(server.url)).connection_for_read() as conn:
        queue = conn.SimpleQueue(QUEUE)
        queue.put({"warm": 1})  # declares the queue and its bindings before counting
        queue.get(timeout=10).ack()
        raw.config_resetstat()
        queue.put({"job": 1})
        message = queue.get(timeout=10)
        message.ack()
        counts = command_counts(raw)
    assert counts.get("ZADD") == 1 and counts.get("ZREM") == 1, counts
    assert not {"MULTI", "EXEC", "HSET", "HDEL", "WATCH"} & counts.keys(), counts
    assert counts.get("LPUSH") == 1 and counts.get("BRPOP") == 1, counts
    assert raw.zcard(UNACKED_MESSAGES) == 0 and raw.llen(QUEUE) == 0


def take_and_die(url: str, flavour: str) -> None:
    subprocess.run([sys.executable, "-c", TAKE_AND_DIE, url, QUEUE, flavour], check=True, timeout=60)


def sweep(url: str, times: int = 2) -> None:
    with create_app(settings(url)).connection_for_read() as conn:
        for _ in range(times):
            conn.default_channel.qos.restore_visible(num=100, interval=1)


def test_a_dead_consumers_message_comes_back_after_the_visibility_timeout_exactly_once(server: LocalRedis) -> None:
    raw = redis.Redis.from_url(server.url)
    with create_app(settings(server.url)).connection_for_write() as conn:
        conn.SimpleQueue(QUEUE).put({"job": 1})
    take_and_die(server.url, "new")
    assert raw.llen(QUEUE) == 0 and raw.zcard(UNACKED_MESSAGES) == 1
    assert raw.zcard(UNACKED_INDEX) == 0 and raw.hlen(UNACKED_HASH) == 0  # nothing in kombu's layout
    sweep(server.url)
    assert raw.llen(QUEUE) == 0, "restored before its visibility timeout"
    [member] = raw.zrange(UNACKED_MESSAGES, 0, -1)
    raw.zadd(UNACKED_MESSAGES, {member: time.time() - 60})  # delivered a minute ago
    sweep(server.url)  # two sweeps, and a copy of the payload could come back twice
    assert raw.llen(QUEUE) == 1 and raw.zcard(UNACKED_MESSAGES) == 0
    with create_app(settings(server.url)).connection_for_read() as conn:
        message = conn.SimpleQueue(QUEUE).get(timeout=10)
        assert message.payload == {"job": 1} and message.delivery_info["redelivered"]
        message.ack()
    assert raw.zcard(UNACKED_MESSAGES) == 0 and raw.llen(QUEUE) == 0


def test_an_entry_a_stock_kombu_worker_left_is_restored_too(server: LocalRedis) -> None:
    raw = redis.Redis.from_url(server.url)
    with create_app(settings(server.url)).connection_for_write() as conn:
        conn.SimpleQueue(QUEUE).put({"job": "legacy"})
    take_and_die(server.url, "stock")
    assert raw.zcard(UNACKED_INDEX) == 1 and raw.hlen(UNACKED_HASH) == 1 and raw.zcard(UNACKED_MESSAGES) == 0
    [tag] = raw.zrange(UNACKED_INDEX, 0, -1)
    raw.zadd(UNACKED_INDEX, {tag: time.time() - 60})
    sweep(server.url)
    assert raw.llen(QUEUE) == 1 and raw.zcard(UNACKED_INDEX) == 0 and raw.hlen(UNACKED_HASH) == 0
    with create_app(settings(server.url)).connection_for_read() as conn:
        assert conn.SimpleQueue(QUEUE).get(timeout=10).payload == {"job": "legacy"}


def test_a_requeue_and_a_closed_channel_put_messages_back_and_an_acked_one_never_returns(
    server: LocalRedis,
) -> None:
    raw = redis.Redis.from_url(server.url)
    app = create_app(settings(server.url))
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue(QUEUE)
        queue.put({"job": 1})
        queue.get(timeout=10).requeue()
        assert raw.llen(QUEUE) == 1 and raw.zcard(UNACKED_MESSAGES) == 0
        message = queue.get(timeout=10)  # held when the connection closes: restored at shutdown
    assert raw.llen(QUEUE) == 1 and raw.zcard(UNACKED_MESSAGES) == 0
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue(QUEUE).get(timeout=10)
        member = raw.zrange(UNACKED_MESSAGES, 0, -1)[0]
        message.ack()
        conn.default_channel.qos.restore_member(member)  # a late sweep of an acked message
    assert raw.llen(QUEUE) == 0 and raw.zcard(UNACKED_MESSAGES) == 0


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://127.0.0.1:1/0", redis_transport.Transport),
        ("rediss://127.0.0.1:1/0", redis_transport.Transport),
        ("redis://127.0.0.1:1/0;redis://127.0.0.1:2/0", redis_transport.Transport),
        ("sentinel://127.0.0.1:1/0;sentinel://127.0.0.1:2/0", redis_transport.SentinelTransport),
        ("amqp://guest:guest@127.0.0.1:1//", pyamqp.Transport),
    ],
)
def test_redis_urls_get_the_transport_also_after_a_failover_switch(url: str, transport: type) -> None:
    status = {"status_url": "redis://127.0.0.1:1/0"} if url.startswith("amqp") else {}
    conn = create_app(Settings(broker_url=url, **status, _env_file=None)).connection_for_read()
    assert conn.get_transport_cls() is transport
    conn.switch(url.split(";")[-1])  # what kombu does on a lost connection with a failover list
    assert conn.get_transport_cls() is transport
    assert isinstance(conn, kombu.Connection)


def test_the_lease_keeper_rescores_a_running_message_and_never_brings_back_an_acked_one(server: LocalRedis) -> None:
    raw = redis.Redis.from_url(server.url)
    app = create_app(settings(server.url))
    keeper = LeaseKeeper(redis.Redis.from_url(server.url), None, app, visibility_timeout=10)  # type: ignore[arg-type]
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(QUEUE)
        queue.put({"job": 1})
        message = queue.get(timeout=10)
        [member] = raw.zrange(UNACKED_MESSAGES, 0, -1)
        raw.zadd(UNACKED_MESSAGES, {member: time.time() - 60})  # about to be swept
        keeper.hold("job-1", "token", message.delivery_tag)
        keeper._touch_messages([message.delivery_tag])  # a beat's re-scoring of what it holds
        assert raw.zscore(UNACKED_MESSAGES, member) > time.time() - 10  # renewed: the sweep leaves it
        sweep(server.url)
        assert raw.llen(QUEUE) == 0
        message.ack()
        keeper._touch_messages([message.delivery_tag])
    assert raw.zcard(UNACKED_MESSAGES) == 0 and raw.zcard(UNACKED_INDEX) == 0


def test_a_stock_kombu_workers_sweep_leaves_the_new_entries_alone(server: LocalRedis) -> None:
    """Mid-way through a rolling upgrade (or after a rollback) old workers sweep too: they must not drop what
    they cannot restore. The entry waits for a sweep that understands it."""
    raw = redis.Redis.from_url(server.url)
    app = create_app(settings(server.url))
    with app.connection_for_write() as conn:
        conn.SimpleQueue(QUEUE).put({"job": 1})
    take_and_die(server.url, "new")
    [member] = raw.zrange(UNACKED_MESSAGES, 0, -1)
    raw.zadd(UNACKED_MESSAGES, {member: time.time() - 60})
    with kombu.Connection(server.url, transport_options=app.conf.broker_transport_options) as stock:
        stock.default_channel.qos.restore_visible(num=100, interval=1)
    assert raw.zcard(UNACKED_MESSAGES) == 1 and raw.llen(QUEUE) == 0
    sweep(server.url)
    assert raw.zcard(UNACKED_MESSAGES) == 0 and raw.llen(QUEUE) == 1
