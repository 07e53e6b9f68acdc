"""A dead worker's unacked message comes back soon after a Redis restart, even when the restart cut a
restore sweep short and left kombu's sweep mutex behind (AOF keeps it)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import redis

from varco.tasks.celery_app import create_app
from varco.tasks.keys import UNACKED_MESSAGES
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import start_redis

QUEUE = "varco.restore-test"

# Takes one message without acking it and dies without any clean-up: a worker killed -9 mid-job.
TAKE_AND_DIE = """
import os, sys
from varco.tasks.celery_app import create_app
from varco.tasks.settings import Settings
app = create_app(Settings(broker_url=sys.argv[1], visibility_timeout=10, _env_file=None))
with app.connection_for_read() as conn:
    message = conn.SimpleQueue(sys.argv[2]).get(timeout=10)
    assert message is not None
    os._exit(0)
"""


def test_a_sweep_mutex_left_by_a_restart_does_not_hold_dead_jobs_for_minutes(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    try:
        app = create_app(Settings(broker_url=server.url, visibility_timeout=10, _env_file=None))
        with app.connection_for_write() as conn:
            conn.SimpleQueue(QUEUE).put({"job": 1})
        subprocess.run([sys.executable, "-c", TAKE_AND_DIE, server.url, QUEUE], check=True, timeout=60)
        raw = redis.Redis.from_url(server.url)
        assert raw.llen(QUEUE) == 0 and raw.zcard(UNACKED_MESSAGES) == 1
        raw.zadd(UNACKED_MESSAGES, {raw.zrange(UNACKED_MESSAGES, 0, 0)[0]: time.time() - 60})  # long dead
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            # A worker took the sweep mutex as configured and lost Redis before releasing it.
            # (kombu's Mutex is redis-py's lock with the channel's expiry.)
            assert raw.lock(channel.unacked_mutex_key, timeout=channel.unacked_mutex_expire).acquire(blocking=False)
            deadline = time.monotonic() + 60
            while raw.llen(QUEUE) == 0 and time.monotonic() < deadline:
                channel.qos.restore_visible(num=100, interval=1)
                time.sleep(0.5)
        assert raw.llen(QUEUE) == 1, "the dead worker's message was still held back after 60 s"
    finally:
        server.stop()
