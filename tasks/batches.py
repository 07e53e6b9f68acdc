"""Batch API records in Redis: files and batches (`tasks/keys.py` names the keys), owned here alone.

A file record says where its bytes are (objects in the result store, `tasks/file_objects.py`) and whose it is.
A batch record is OpenAI's Batch object plus the runner's checkpoint (lines expanded and the input's byte
offset there, lines finalized and the output parts written). The runner (`producer/batch_runner.py`) holds a
lease on a batch while it works on it, and every write of its record or of its job list is fenced by that
lease in one Lua step: a runner that lost its lease (killed, paused) can never overwrite a newer checkpoint.
The job ids of a batch's lines are appended with the checkpoint that counts them, in the same step, so the
list always holds exactly the lines expanded.
"""

from __future__ import annotations

import json
import time
import uuid
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, Field

from varco.tasks import keys

FILE_ID_PREFIX = "file-"
BATCH_ID_PREFIX = "batch_"
MAX_LIST = 100


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


class LeaseLost(RuntimeError):
    """A fenced write by a runner whose lease on the batch ended: another runner owns the batch now."""


def now() -> int:
    return int(time.time())


def new_file_id() -> str:
    return FILE_ID_PREFIX + uuid.uuid4().hex


def new_batch_id() -> str:
    return BATCH_ID_PREFIX + uuid.uuid4().hex


class FileRecord(BaseModel):
    id: str
    owner: str = ""
    purpose: str
    filename: str
    bytes: int
    created_at: int
    lines: int = 0
    parts: list[str]  # object URIs, read one after another (an output file is written in parts)

    def openai(self) -> dict[str, Any]:
        """OpenAI's FileObject."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}  # fmt: skip


class LineError(BaseModel):
    """One entry of a failed batch's `errors.data`: what is wrong with which line (1-based)."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchRecord(BaseModel):
    id: str
    owner: str = ""
    tenant: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    priority: int
    status: BatchStatus = BatchStatus.VALIDATING
    created_at: int
    expires_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[LineError] | None = None
    # The runner's checkpoint.
    validated: bool = False  # every line checked; `total` counts them
    expanded: int = 0  # lines submitted as jobs (their ids are the batch's job list)
    input_offset: int = 0  # the input's byte offset after the last expanded line
    finalized: int = 0  # lines written to output or error parts
    output_parts: list[str] = Field(default_factory=list)
    error_parts: list[str] = Field(default_factory=list)
    output_bytes: int = 0
    error_bytes: int = 0
    output_lines: int = 0
    error_lines: int = 0
    settled: int = 0  # lines from the first whose jobs have all finished
    settled_completed: int = 0
    settled_failed: int = 0
    stopped: str | None = None  # "cancelled" or "expired": no more lines start
    final_offset: int = 0  # the input's byte offset after the last finalized line

    def move(self, status: BatchStatus) -> None:
        """Enter `status`, stamping its timestamp (`{status}_at`) once."""
        self.status = status
        stamp = {BatchStatus.IN_PROGRESS: "in_progress_at"}.get(status, f"{status.value}_at")
        if stamp in type(self).model_fields and getattr(self, stamp) is None:
            setattr(self, stamp, now())

    def openai(self) -> dict[str, Any]:
        """OpenAI's Batch object."""
        errors = None
        if self.errors:
            errors = {"object": "list", "data": [e.model_dump(exclude_none=True) for e in self.errors]}
        stamps = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
                  "expired_at", "cancelling_at", "cancelled_at")  # fmt: skip
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": errors,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status.value, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            **{name: getattr(self, name) for name in stamps},
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }  # fmt: skip


# KEYS[1] lease; ARGV[1] token. Then the fenced writes: KEYS[2] record hash, ARGV[2] record JSON,
# KEYS[3] job list, ARGV[3..] job ids to append. Returns 1, or 0 when the lease is not the caller's.
_FENCED_SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'record', ARGV[2])
for i = 3, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
return 1
"""
# KEYS[1] lease, KEYS[2] job list; ARGV: token, index, job id. Replaces one line's job (an orphan's).
_FENCED_REPLACE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('LSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class BatchStore:
    """Files and batches; `owner=None` in a read means any owner (the gateway's --no-auth)."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.redis, self.ttl = client, ttl
        self._save = client.register_script(_FENCED_SAVE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._replace = client.register_script(_FENCED_REPLACE)

    # --- files ----------------------------------------------------------------------------
    def add_file(self, record: FileRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(keys.file(record.id), record.model_dump_json())
            pipe.zadd(keys.files_by_owner(record.owner), {record.id: record.created_at})
            pipe.execute()

    def file(self, file_id: str, owner: str | None = None) -> FileRecord | None:
        raw = self.redis.get(keys.file(file_id)) if file_id.startswith(FILE_ID_PREFIX) else None
        record = FileRecord.model_validate_json(raw) if raw else None
        return record if record is not None and (owner is None or record.owner == owner) else None

    def files(self, owner: str, purpose: str | None = None, after: str | None = None, limit: int = MAX_LIST,
              ascending: bool = False) -> list[FileRecord]:  # fmt: skip
        ids = self.redis.zrange(keys.files_by_owner(owner), 0, -1, desc=not ascending)
        found = [r for r in self._after(ids, after, self.file) if purpose is None or r.purpose == purpose]
        return found[:limit]

    def delete_file(self, record: FileRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.file(record.id))
            pipe.zrem(keys.files_by_owner(record.owner), record.id)
            pipe.execute()

    # --- batches --------------------------------------------------------------------------
    def add_batch(self, record: BatchRecord) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.batch(record.id), "record", record.model_dump_json())
            pipe.zadd(keys.batches_by_owner(record.owner), {record.id: record.created_at})
            pipe.zadd(keys.BATCHES_ACTIVE, {record.id: record.created_at})
            pipe.execute()

    def batch(self, batch_id: str, owner: str | None = None) -> BatchRecord | None:
        """The batch as readers see it: `cancelling` from the moment a cancel was asked for."""
        if not batch_id.startswith(BATCH_ID_PREFIX):
            return None
        raw, cancel = self.redis.hmget(keys.batch(batch_id), ["record", "cancel"])
        record = BatchRecord.model_validate_json(raw) if raw else None
        if record is None or (owner is not None and record.owner != owner):
            return None
        if cancel and record.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
            record.status, record.cancelling_at = BatchStatus.CANCELLING, int(cancel)
        return record

    def batches(self, owner: str, after: str | None = None, limit: int = MAX_LIST) -> list[BatchRecord]:
        ids = self.redis.zrange(keys.batches_by_owner(owner), 0, -1, desc=True)  # newest first, as OpenAI lists
        return list(self._after(ids, after, self.batch))[:limit]

    @staticmethod
    def _after(ids: list[str], after: str | None, read: Any) -> Any:
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        for item in ids:
            if (record := read(item)) is not None:
                yield record

    def active(self) -> list[str]:
        return list(self.redis.zrange(keys.BATCHES_ACTIVE, 0, -1))

    def request_cancel(self, batch_id: str) -> None:
        """Ask the batch's runner to cancel it (it moves the batch to `cancelling` and `cancelled`)."""
        self.redis.hsetnx(keys.batch(batch_id), "cancel", str(now()))

    def cancel_requested(self, batch_id: str) -> int | None:
        """When a cancel was asked for, or None."""
        value = self.redis.hget(keys.batch(batch_id), "cancel")
        return int(value) if value else None

    def job_ids(self, batch_id: str, start: int, stop: int) -> list[str]:
        """The job ids of lines [start, stop) (0-based)."""
        return list(self.redis.lrange(keys.batch_jobs(batch_id), start, stop - 1)) if stop > start else []

    # --- the runner's lease and fenced writes ----------------------------------------------
    def claim(self, batch_id: str, token: str, lease_s: float) -> bool:
        return bool(self.redis.set(keys.batch_lease(batch_id), token, nx=True, px=int(lease_s * 1000)))

    def renew(self, batch_id: str, token: str, lease_s: float) -> None:
        if not self._renew(keys=[keys.batch_lease(batch_id)], args=[token, int(lease_s * 1000)]):
            raise LeaseLost(batch_id)

    def release(self, batch_id: str, token: str) -> None:
        self._release(keys=[keys.batch_lease(batch_id)], args=[token])

    def save(self, record: BatchRecord, token: str, new_job_ids: list[str] | None = None) -> None:
        """Write the record (and append job ids) if `token` still holds the batch's lease; else LeaseLost."""
        names = [keys.batch_lease(record.id), keys.batch(record.id), keys.batch_jobs(record.id)]
        if not self._save(keys=names, args=[token, record.model_dump_json(), *(new_job_ids or [])]):
            raise LeaseLost(record.id)

    def replace_job(self, batch_id: str, token: str, index: int, job_id: str) -> None:
        """Line `index` (0-based) is run by `job_id` from now on, if `token` still holds the lease."""
        if not self._replace(keys=[keys.batch_lease(batch_id), keys.batch_jobs(batch_id)], args=[token, index, job_id]):
            raise LeaseLost(batch_id)

    def finish(self, record: BatchRecord, token: str) -> None:
        """Save a finished batch and take it off the runners' list; its job list expires after the status TTL."""
        self.save(record, token)
        with self.redis.pipeline() as pipe:
            pipe.zrem(keys.BATCHES_ACTIVE, record.id)
            pipe.expire(keys.batch_jobs(record.id), self.ttl)
            pipe.execute()


def dumps_line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
