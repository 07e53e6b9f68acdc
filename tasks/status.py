"""Job status records in Redis: forward-only transitions, attempt counting, cancel flags, events.

A record is a Redis hash `varco:job:{id}`. Every change runs as one Lua script, so a redelivered
message or two workers racing can never move a job backwards (`queued -> started/retrying ->
succeeded | failed | cancelled`), and each change is published on `varco:events` in the same step.
Records expire `VARCO_STATUS_TTL` seconds after their last change.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis

from varco.tasks.job_ids import check_job_id
from varco.tasks.schemas import ErrorInfo, JobState, JobStatus

EVENTS_CHANNEL = "varco:events"
CANCEL_CHANNEL = "varco:cancel"

_COMMON = """
local rank = {queued=0, started=1, retrying=1, succeeded=2, failed=2, cancelled=2}
local function publish(key, channel)
  local flat = redis.call('HGETALL', key)
  local record = {}
  for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
  redis.call('PUBLISH', channel, cjson.encode(record))
end
"""

# KEYS[1] record; ARGV: new state, ttl, now, then field/value pairs. Returns {changed, state}.
_TRANSITION = (
    _COMMON
    + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
if rank[cur] == 2 or rank[ARGV[1]] < rank[cur] then return {0, cur} end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[3])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if rank[ARGV[1]] == 2 then redis.call('HSET', KEYS[1], 'finished_at', ARGV[3]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
publish(KEYS[1], '"""
    + EVENTS_CHANNEL
    + """')
return {1, ARGV[1]}
"""
)

# KEYS[1] record; ARGV: max attempts, ttl, now, worker, poison error JSON, job id.
# Counts this delivery; fails a poison message, honours a cancel, else marks the job started.
_BEGIN = (
    _COMMON
    + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then
  redis.call('HSET', KEYS[1], 'job_id', ARGV[6], 'state', 'queued', 'created_at', ARGV[3])
  cur = 'queued'
end
if rank[cur] == 2 then return {cur, tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')} end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local state = 'started'
if n > tonumber(ARGV[1]) then
  state = 'failed'
  redis.call('HSET', KEYS[1], 'error', ARGV[5], 'finished_at', ARGV[3])
elseif redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  state = 'cancelled'
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3], 'worker', ARGV[4])
end
redis.call('HSET', KEYS[1], 'state', state, 'updated_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
publish(KEYS[1], '"""
    + EVENTS_CHANNEL
    + """')
return {state, n}
"""
)

# KEYS[1] record; ARGV: ttl, now, job id. A queued or retrying job is cancelled at once; a started
# one is flagged and told over pub/sub so its worker stops generating. Returns the state after.
_CANCEL = (
    _COMMON
    + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return '' end
if rank[cur] == 2 then return cur end
redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[2])
if cur == 'queued' or cur == 'retrying' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[2])
  cur = 'cancelled'
  publish(KEYS[1], '"""
    + EVENTS_CHANNEL
    + """')
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('PUBLISH', '"""
    + CANCEL_CHANNEL
    + """', ARGV[3])
return cur
"""
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def record_to_status(record: dict[str, str]) -> JobStatus:
    data: dict[str, Any] = {k: v for k, v in record.items() if v != ""}
    if "error" in data:
        data["error"] = ErrorInfo.model_validate_json(data["error"])
    return JobStatus.model_validate(data)


class StatusStore:
    def __init__(self, client: redis.Redis, ttl: int, prefix: str = "varco") -> None:
        self.redis = client
        self.ttl = ttl
        self.prefix = prefix
        self._transition = client.register_script(_TRANSITION)
        self._begin = client.register_script(_BEGIN)
        self._cancel = client.register_script(_CANCEL)

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{check_job_id(job_id)}"  # a malformed id never becomes a key

    def create(self, job_id: str, task: str, **fields: str) -> None:
        now = now_iso()
        record = {"job_id": job_id, "state": JobState.QUEUED.value, "task": task, "attempts": "0",
                  "created_at": now, "updated_at": now, **fields}  # fmt: skip
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(job_id), mapping=record)
            pipe.expire(self.key(job_id), self.ttl)
            pipe.execute()

    def delete(self, job_id: str) -> None:
        self.redis.delete(self.key(job_id))

    def record(self, job_id: str) -> dict[str, str]:
        return self.redis.hgetall(self.key(job_id))

    def get(self, job_id: str) -> JobStatus | None:
        record = self.record(job_id)
        return record_to_status(record) if record else None

    def get_many(self, job_ids: list[str]) -> dict[str, JobStatus | None]:
        """Several records in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.key(job_id))
            records = pipe.execute()
        return {j: record_to_status(r) if r else None for j, r in zip(job_ids, records, strict=True)}

    def transition(self, job_id: str, state: JobState, *, error: ErrorInfo | None = None, **fields: str) -> bool:
        """Move forward to `state`; False (and nothing written) when that would go backwards."""
        if error is not None:
            fields["error"] = error.model_dump_json()
        args: list[str] = [state.value, str(self.ttl), now_iso()]
        for name, value in fields.items():
            args += [name, value]
        changed, _ = self._transition(keys=[self.key(job_id)], args=args)
        return bool(changed)

    def begin_attempt(self, job_id: str, worker: str, max_attempts: int) -> tuple[JobState, int]:
        poison = ErrorInfo(
            type="PoisonMessageError",
            message=f"job was delivered more than {max_attempts} times without finishing "
            "(a worker crashed or ran out of memory on it)",
        )
        state, attempts = self._begin(
            keys=[self.key(job_id)],
            args=[max_attempts, self.ttl, now_iso(), worker, poison.model_dump_json(), job_id],
        )
        return JobState(state), int(attempts)

    def request_cancel(self, job_id: str) -> JobState | None:
        state = self._cancel(keys=[self.key(job_id)], args=[self.ttl, now_iso(), job_id])
        return JobState(state) if state else None

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.key(job_id), "cancel_requested") == "1"

    def claim_idempotency_key(self, key: str, job_id: str) -> str:
        """The job id already bound to `key`, or `job_id` after binding it (atomic SET NX)."""
        name = f"{self.prefix}:idem:{key}"
        if self.redis.set(name, job_id, nx=True, ex=self.ttl):
            return job_id
        return self.redis.get(name) or job_id

    def release_idempotency_key(self, key: str, job_id: str) -> None:
        name = f"{self.prefix}:idem:{key}"
        if self.redis.get(name) == job_id:
            self.redis.delete(name)


def parse_event(message: str) -> JobStatus | None:
    try:
        return record_to_status(json.loads(message))
    except (ValueError, TypeError):
        return None
