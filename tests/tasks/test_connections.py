"""Broker URLs as Celery writes them: several sentinels joined by `;`, the master's db and password in the
first; passwords never reach a message."""

from __future__ import annotations

import warnings

import pytest
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import SentinelConnectionPool

from varco.tasks.celery_app import create_app
from varco.tasks.connections import async_redis_client, describe, is_sentinel, parse_sentinel_url
from varco.tasks.settings import Settings

SENTINELS = "sentinel://:p%40ss@10.0.0.1:26380/3;sentinel://10.0.0.2;sentinel://user:x@h3:26379/3"


def test_a_sentinel_list_names_every_sentinel_and_the_masters_db_and_password() -> None:
    target = parse_sentinel_url(SENTINELS)
    assert target.sentinels == [("10.0.0.1", 26380), ("10.0.0.2", 26379), ("h3", 26379)]
    assert (target.db, target.username, target.password) == (3, None, "p@ss")
    assert is_sentinel(SENTINELS) and not is_sentinel("redis://sentinel:6379/0")


@pytest.mark.parametrize("url", ["sentinel://h:26379/zero", "sentinel://h:26379/0;redis://h2:6379/0", "sentinel:///0"])
def test_a_malformed_sentinel_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse_sentinel_url(url)


def test_messages_show_no_password() -> None:
    shown = describe(SENTINELS)
    assert "p%40ss" not in shown and ":x@" not in shown and shown.count("sentinel://") == 3


def test_the_celery_app_names_the_sentinel_master() -> None:
    settings = Settings(broker_url=SENTINELS, sentinel_master="queue-master", redis_timeout_s=2)
    options = create_app(settings).conf.broker_transport_options
    assert options["master_name"] == "queue-master"
    assert options["socket_timeout"] == 2 and options["sentinel_kwargs"]["socket_timeout"] == 2
    assert "master_name" not in create_app(Settings(broker_url="redis://h:6379/0")).conf.broker_transport_options


def test_the_gateways_asyncio_client_asks_the_sentinels_for_the_master() -> None:
    settings = Settings(broker_url=SENTINELS, sentinel_master="queue-master", redis_timeout_s=2)
    pool = async_redis_client(settings).connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "queue-master"
    master = pool.connection_kwargs
    assert (master["db"], master["password"], master["socket_timeout"]) == (3, "p@ss", 2)
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("10.0.0.1", 26380), ("10.0.0.2", 26379), ("h3", 26379)]
    assert all(s["password"] is None and s["socket_timeout"] == 2 for s in sentinels)  # sentinels: no password


def test_the_gateways_asyncio_client_has_the_timeouts_and_retry_of_every_client() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # redis-py warns when it has to convert a sync Retry
        client = async_redis_client(Settings(broker_url="redis://h:6379/2", redis_timeout_s=3))
    options = client.connection_pool.connection_kwargs
    assert (options["host"], options["db"], options["socket_timeout"], options["socket_keepalive"]) == ("h", 2, 3, True)
    assert isinstance(options["retry"], AsyncRetry) and options["retry"]._retries == 1
