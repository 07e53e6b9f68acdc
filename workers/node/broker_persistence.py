"""At node start: does the broker's Redis persist anything? Without AOF or RDB a Redis restart loses every
queued job and every status record, so the node says so loudly (it still starts: that is the operator's
call, and a dev box may not care)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

import redis

log = logging.getLogger("varco.supervisor")

ADVICE = (
    "run Redis with --appendonly yes --appendfsync everysec (docs/redis.md); "
    "infra/compose.yaml and infra/k8s/redis.yaml do"
)


class Persistence(Enum):
    """How much of the broker's data survives a Redis restart."""

    AOF = "aof"
    """Append-only file: at most about a second of writes is lost (appendfsync everysec)."""
    RDB_ONLY = "rdb-only"
    """Snapshots only: whatever changed since the last snapshot is lost."""
    NONE = "none"
    """Nothing is saved: a restart loses every queued job and status record."""
    UNKNOWN = "unknown"
    """CONFIG GET was refused (managed Redis, ACLs) or Redis did not answer."""


@dataclass(frozen=True)
class PersistenceReport:
    persistence: Persistence
    detail: str


def broker_persistence(client: redis.Redis) -> PersistenceReport:
    """Read appendonly, appendfsync and save from the broker; never raises."""
    try:
        config = {**client.config_get("appendonly"), **client.config_get("appendfsync"), **client.config_get("save")}
    except redis.ResponseError as exc:  # CONFIG renamed away or not allowed by ACL: managed Redis
        return PersistenceReport(Persistence.UNKNOWN, f"CONFIG GET refused ({exc})")
    except (redis.RedisError, OSError) as exc:
        return PersistenceReport(Persistence.UNKNOWN, f"broker not reachable ({type(exc).__name__}: {exc})")
    config = {_text(k): _text(v) for k, v in config.items()}
    save = config.get("save", "").strip()
    if config.get("appendonly") == "yes":
        return PersistenceReport(Persistence.AOF, f"appendonly yes, appendfsync {config.get('appendfsync', '?')}")
    if save:
        return PersistenceReport(Persistence.RDB_ONLY, f"appendonly no, RDB save points {save!r}")
    return PersistenceReport(Persistence.NONE, "appendonly no and no RDB save points")


def log_broker_persistence(client: redis.Redis, where: str) -> PersistenceReport:
    """One log line at node start; a warning when a Redis restart would lose queued jobs."""
    report = broker_persistence(client)
    if report.persistence is Persistence.NONE:
        log.warning(
            "the broker at %s persists nothing (%s): a Redis restart loses every queued job and every status "
            "record; %s", where, report.detail, ADVICE,
        )  # fmt: skip
    elif report.persistence is Persistence.RDB_ONLY:
        log.warning(
            "the broker at %s saves only RDB snapshots (%s): a Redis restart loses the jobs queued since the "
            "last snapshot; %s", where, report.detail, ADVICE,
        )  # fmt: skip
    elif report.persistence is Persistence.UNKNOWN:
        log.info(
            "cannot tell whether the broker at %s persists its data: %s; make sure it runs with AOF "
            "(appendonly yes) or queued jobs are lost when it restarts", where, report.detail,
        )  # fmt: skip
    else:
        log.info("the broker at %s persists its data (%s)", where, report.detail)
    return report


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
