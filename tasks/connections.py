"""Redis connections from Settings: the one place a Redis client is built (plain, TLS or Sentinel).

Like arq's `connections.py`: connection settings and pools, nothing else. Every side (client, worker
process, cancel watcher, health checks, CLI, dev tools, and the gateway's asyncio client) gets its client
here, so a `sentinel://` URL and the timeouts work the same everywhere.

`VARCO_BROKER_URL` takes what Celery takes: `redis://`, `rediss://`, or Sentinel as
`sentinel://[:password@]host:26379/0;sentinel://host2:26379/0` with the master group in
`VARCO_SENTINEL_MASTER`. A password in a sentinel URL is the master's (as in kombu); the sentinels
themselves are reached without one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from varco.tasks.settings import Settings

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379
# redis-py replaces a pooled connection that Redis closed (restart, failover) when it takes it from the
# pool; one retry also rides out a connection lost in the middle of a command. redis-py nests its
# retries (command, connect), so a hung Redis costs a few socket timeouts (measured: 2 x
# VARCO_REDIS_TIMEOUT_S). A Redis that refuses connections fails a call at once.
RETRIES = 1
# A worker has nothing better to do than wait for Redis: its status writes ride out a restart (about 7 s
# of backoff between attempts) instead of failing the job's bookkeeping, as redis-py's own default does.
WORKER_RETRIES = 10
# kombu's own checks of its long-lived BRPOP and pub/sub connections.
HEALTH_CHECK_INTERVAL_S = 25


class BrokerUnavailable(ConnectionError):
    """Redis (the broker and the status records) did not answer within VARCO_REDIS_TIMEOUT_S and a few
    retries. A `submit` that raises it enqueued nothing; a `submit_many` enqueued exactly the jobs in
    `.enqueued` (in order), so resubmitting the rest later is safe."""

    def __init__(self, message: str, enqueued: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.enqueued = list(enqueued)


@dataclass(frozen=True)
class SentinelTarget:
    """Where a sentinel:// URL points: the sentinels to ask, and the database and credentials of the master."""

    sentinels: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def parse_sentinel_url(url: str) -> SentinelTarget:
    """`sentinel://[:pw@]h1:26379/0;sentinel://h2:26379/0` -> the sentinels, and the first part's db and
    credentials (Celery and kombu read them from there too)."""
    parts = [part.strip() for part in url.split(";") if part.strip()]
    if not parts or not all(is_sentinel(part) for part in parts):
        raise ValueError(f"not a sentinel:// URL list: {maybe_sanitize_url(url)!r}")
    first = urlsplit(parts[0])
    path = first.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ValueError(f"sentinel URL database must be a number, not {path!r}") from None
    sentinels = []
    for part in parts:
        split = urlsplit(part)
        if not split.hostname:
            raise ValueError(f"sentinel URL without a host: {maybe_sanitize_url(part)!r}")
        sentinels.append((split.hostname, split.port or DEFAULT_SENTINEL_PORT))
    return SentinelTarget(
        sentinels=sentinels,
        db=db,
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
    )


def connection_options(timeout_s: float, retries: int = RETRIES, *, asyncio: bool = False) -> dict[str, Any]:
    """Timeouts and retries every Redis connection of ours uses (`asyncio`: for a redis.asyncio client)."""
    backoff = ExponentialWithJitterBackoff(base=0.1, cap=1.0)
    return {
        "socket_connect_timeout": timeout_s,
        "socket_timeout": timeout_s,
        "socket_keepalive": True,
        # No redis-py health-check PING: it adds a third level of nested retries on every new connection,
        # and a timed-out command already drops a dead connection.
        "retry": AsyncRetry(backoff, retries) if asyncio else Retry(backoff, retries),
    }


def redis_from_url(
    url: str,
    *,
    sentinel_master: str = "mymaster",
    timeout_s: float = 5.0,
    retries: int = RETRIES,
    decode_responses: bool = True,
) -> redis.Redis:
    """A client for a broker URL. With a sentinel:// URL it asks the sentinels for the current master on
    every new connection, so it follows a failover."""
    options = connection_options(timeout_s, retries)
    return _client_for(url, sentinel_master, options, decode_responses, redis.Redis, Sentinel)


def _client_for(
    url: str, sentinel_master: str, options: dict[str, Any], decode_responses: bool, plain: Any, sentinel_class: Any
) -> Any:
    """A plain client (`plain.from_url`) or, for a sentinel:// URL, the master through `sentinel_class`:
    the sync and the asyncio client are built alike."""
    if not is_sentinel(url):
        return plain.from_url(url, decode_responses=decode_responses, **options)
    target = parse_sentinel_url(url)
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel = sentinel_class(target.sentinels, sentinel_kwargs=sentinel_options, **options)
    return sentinel.master_for(
        sentinel_master,
        db=target.db,
        username=target.username,
        password=target.password,
        decode_responses=decode_responses,
    )


def redis_client(
    settings: Settings, *, timeout_s: float | None = None, retries: int = RETRIES, decode_responses: bool = True
) -> redis.Redis:
    """A client for the status Redis (status records, pub/sub, the fair queue; with a Redis broker also its
    queue lengths), from settings.
    Health probes pass a shorter `timeout_s` and no retries: a probe must answer within its own timeout."""
    return redis_from_url(
        settings.status_redis_url,
        sentinel_master=settings.sentinel_master,
        timeout_s=timeout_s or settings.redis_timeout_s,
        retries=retries,
        decode_responses=decode_responses,
    )


def async_redis_client(
    settings: Settings, *, retries: int = RETRIES, max_connections: int | None = None
) -> aioredis.Redis:
    """`redis_client`'s asyncio twin, for the gateway: watching jobs holds no thread. The same URL forms,
    Sentinel included (it follows a failover the same way), timeouts and retries. `max_connections` sizes
    its pool (redis-py's asyncio default is 100; connections are opened only when needed)."""
    options = connection_options(settings.redis_timeout_s, retries, asyncio=True)
    if max_connections is not None:
        options["max_connections"] = max_connections
    client: aioredis.Redis = _client_for(
        settings.status_redis_url, settings.sentinel_master, options, True, aioredis.Redis, AsyncSentinel
    )
    return client


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """The connection part of Celery's `broker_transport_options`: kombu's sentinel transport needs the
    master's name; the timeouts keep a publish on a dead or hung broker from waiting forever."""
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_timeout_s,
        "socket_timeout": settings.redis_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
    if is_sentinel(settings.broker_url):
        options["master_name"] = settings.sentinel_master
        options["sentinel_kwargs"] = {
            "socket_connect_timeout": settings.redis_timeout_s,
            "socket_timeout": settings.redis_timeout_s,
        }
    return options


# A failed publish is retried twice, quickly. With the socket timeout above, a publish on a hung broker
# gives up after about 20 s (measured; it used to wait forever).
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def describe(url: str) -> str:
    """The broker URL without its password, for messages and logs."""
    return ";".join(maybe_sanitize_url(part) for part in url.split(";"))


@contextmanager
def broker_errors(settings: Settings) -> Iterator[None]:
    """Turn whatever redis-py or kombu raise when the broker is unreachable into BrokerUnavailable."""
    try:
        yield
    except (BrokerUnavailable, TimeoutError):  # ours, and a `wait` past its own timeout (an OSError too)
        raise
    except OperationalError as exc:  # kombu: the broker (Redis or RabbitMQ)
        raise BrokerUnavailable(
            f"the broker at {describe(settings.broker_url)} is unavailable: {type(exc).__name__}: {exc}"
        ) from exc
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BrokerUnavailable(
            f"Redis at {describe(settings.status_redis_url)} is unavailable: {type(exc).__name__}: {exc}"
        ) from exc
    except redis.RedisError as exc:  # e.g. READONLY, LOADING, NOAUTH: the broker is there but unusable
        raise BrokerUnavailable(
            f"Redis at {describe(settings.status_redis_url)} refused the call: {type(exc).__name__}: {exc}"
        ) from exc
