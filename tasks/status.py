"""Job status records in Redis: forward-only transitions, attempt counting, cancel flags, events.

A record is a JSON object of string fields in one Redis string, `varco:job:{id}` (`tasks/keys.py`). Every
change runs as one Lua script, so a redelivered message or two workers racing can never move a job backwards
(`queued -> started/retrying -> succeeded | failed | cancelled`), and each change is published on
`varco:events` in the same step. Records expire `VARCO_STATUS_TTL` seconds after their last change.

Why a string and not a hash (a hash until 2026-12-06): a change is then one GET and one `SET … EX`, the TTL
riding on the write, and the JSON written is the JSON published; a hash needed HSET, HDEL and EXPIRE apart
(docs/redis.md#cost-per-job), and a wait reads many records with one MGET. Records of the hash layout (a
rolling upgrade) are still read, and written back as hashes, so an older Client still reads them.

A running job holds a lease in its record (`lease_owner`, `lease_until` on Redis's own clock), renewed by
its worker's heartbeat: a redelivery while the lease lives is told to wait, neither run nor counted.

This module owns the record: every field is written and read through `StatusStore` (or, in asyncio code,
`tasks/async_status.AsyncStatusStore`), never by raw hash commands elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import deque
from datetime import UTC, datetime
from typing import Any, NamedTuple

import redis

from varco.tasks import keys
from varco.tasks.group_commit import GroupCommit
from varco.tasks.keys import CANCEL_CHANNEL, EVENTS_CHANNEL  # also importable from here, as before
from varco.tasks.requests import IdempotencyKeyReused
from varco.tasks.schemas import FINISHED_RANK, ErrorInfo, JobState, JobStatus

LINGER_S = 0.002  # how long a claim or an end waits for the others of its engine batch (tasks/group_commit.py)

# Leases (and the fair queue's deadlines) are timed on the Redis server's clock, so clocks need not agree.
LUA_CLOCK = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
"""

# The state order of JobState.rank, so the scripts and Python never disagree: `rank[state]`, FINISHED at the end.
_RANKS = (
    "local rank = {" + ", ".join(f"{state.value}={state.rank}" for state in JobState) + "}\n"
    f"local FINISHED = {FINISHED_RANK}\n"
)

_COMMON = (
    _RANKS
    + """
-- Records read as hashes, the layout before 2026-12-06: written back as hashes, so that clients and gateways
-- of the older version, which read them with HGETALL, can still follow the jobs they submitted (a rolling
-- upgrade: workers first).
local hashes = {}
local function read(key)
  local raw = redis.pcall('GET', key)
  if type(raw) == 'table' then  -- WRONGTYPE: a hash
    hashes[key] = true
    local flat = redis.call('HGETALL', key)
    local record = {}
    for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
    return record
  end
  if not raw then return {} end
  return cjson.decode(raw)
end
local function add(list, ...)
  for _, v in ipairs({...}) do table.insert(list, v) end
end
-- Field/value pairs into the record's table; nothing reaches Redis until `write`.
local function set(record, pairs)
  for i = 1, #pairs, 2 do record[pairs[i]] = pairs[i + 1] end
end
local function drop(record, names)
  for _, name in ipairs(names) do record[name] = nil end
end
-- The record whole, with its TTL, in one SET; returns the JSON written (and published).
local function write(key, record, ttl)
  local json = cjson.encode(record)
  if hashes[key] then  -- a hash stays a hash: replaced whole, as the SET replaces a string
    local flat = {}
    for k, v in pairs(record) do add(flat, k, v) end
    redis.call('DEL', key)
    redis.call('HSET', key, unpack(flat))
    redis.call('EXPIRE', key, tonumber(ttl))
    return json
  end
  redis.call('SET', key, json, 'EX', tonumber(ttl))
  return json
end
-- The record as just written: the same JSON, no second read or encode.
local function publish(json, channel)
  redis.call('PUBLISH', channel, json)
end
-- A batch's records as written, in one message: the record alone, or a JSON array of them (`parse_events`).
local function publish_all(events, channel)
  if #events == 1 then
    publish(events[1], channel)
  elseif #events > 1 then
    publish('[' .. table.concat(events, ',') .. ']', channel)
  end
end
-- KEYS: one record per job; ARGV: per job, its argument count, then its arguments. Runs `one(key, args)` for
-- each job in order and returns their answers, flattened.
local function each(one)
  local out, i = {}, 1
  for j = 1, #KEYS do
    local n = tonumber(ARGV[i])
    local A = {}
    for k = 1, n do A[k] = ARGV[i + k] end
    i = i + n + 1
    for _, v in ipairs(one(KEYS[j], A)) do table.insert(out, v) end
  end
  return out
end
"""
)

# Each script reads each record once (GET), writes it whole with its TTL (one SET … EX), and publishes the JSON
# it wrote, every job of the call in one PUBLISH: per job 2 commands, per call the script and the PUBLISH
# (docs/redis.md#cost-per-job). A worker's threads claim and end their jobs through a GroupCommit, so the jobs
# of one engine batch share a call.

# Per job (`each`): its record; new state, ttl, now, recreate ('1': a terminal move makes a missing record anew
# from the fields, which then carry job_id and task), then field/value pairs. Answers {changed, state} per job.
_TRANSITION = (
    _COMMON
    + """
local events = {}
local function one(key, A)
  local record = read(key)
  local cur = record.state
  local change = {}
  if not cur then
    if A[4] ~= '1' or rank[A[1]] ~= FINISHED then return {0, ''} end
    add(change, 'created_at', A[3], 'recreated', '1')
    cur = 'queued'
  end
  if rank[cur] == FINISHED or rank[A[1]] < rank[cur] then return {0, cur} end
  add(change, 'state', A[1], 'updated_at', A[3])
  for i = 5, #A, 2 do add(change, A[i], A[i + 1]) end
  local gone = {}
  if A[1] == 'succeeded' then add(gone, 'error') end
  if rank[A[1]] == FINISHED then
    add(change, 'finished_at', A[3])
    add(gone, 'lease_owner', 'lease_until')
  end
  set(record, change)
  drop(record, gone)
  table.insert(events, write(key, record, A[2]))
  return {1, A[1]}
end
local out = each(one)
publish_all(events, '"""
    + EVENTS_CHANNEL
    + """')
return out
"""
)

# Per job (`each`): its record; max attempts, ttl, now, worker, poison error JSON, job id, lease token ('' for
# none), lease seconds. Answers {state, attempts, lease seconds left} per job: while another token's lease lives the
# delivery is neither run nor counted (state 'leased'); else it is counted, a poison message fails, a cancel
# is honoured, or the job is marked started under this token's lease.
_BEGIN = (
    _COMMON
    + LUA_CLOCK
    + """
local events = {}
local now
local function one(key, A)
  local record = read(key)
  local cur = record.state
  local change = {}
  if not cur then
    add(change, 'job_id', A[6], 'state', 'queued', 'created_at', A[3])
    cur = 'queued'
  end
  if rank[cur] == FINISHED then return {cur, tonumber(record.attempts or '0'), '0'} end
  now = now or clock()  -- one clock read for the batch
  local owner = record.lease_owner
  local left = tonumber(record.lease_until or '0') - now
  if owner and owner ~= A[7] and left > 0 then
    return {'leased', tonumber(record.attempts or '0'), tostring(left)}
  end
  local n = tonumber(record.attempts or '0') + 1
  add(change, 'attempts', tostring(n))
  local state = 'started'
  if n > tonumber(A[1]) then
    state = 'failed'
    add(change, 'error', A[5], 'finished_at', A[3])
  elseif record.cancel_requested == '1' then
    state = 'cancelled'
    add(change, 'finished_at', A[3])
  else
    add(change, 'started_at', A[3], 'worker', A[4])
    if A[7] ~= '' then
      add(change, 'lease_owner', A[7], 'lease_until', tostring(now + tonumber(A[8])))
    end
  end
  add(change, 'state', state, 'updated_at', A[3])
  set(record, change)
  table.insert(events, write(key, record, A[2]))
  return {state, n, '0'}
end
local out = each(one)
publish_all(events, '"""
    + EVENTS_CHANNEL
    + """')
return out
"""
)

# KEYS: records; ARGV: lease seconds, ttl, then one token per key. Extends each lease its token still holds on
# a running job; returns how many it extended. Not published: a heartbeat is no state change.
_RENEW = (
    _COMMON
    + LUA_CLOCK
    + """
local extended = 0
local expiry = tostring(clock() + tonumber(ARGV[1]))
for i, key in ipairs(KEYS) do
  local record = read(key)
  if (record.state == 'started' or record.state == 'retrying') and record.lease_owner == ARGV[i + 2] then
    record.lease_until = expiry
    write(key, record, ARGV[2])
    extended = extended + 1
  end
end
return extended
"""
)

# KEYS[1] record; ARGV[1] token. Ends the lease if this token holds it (a job handing itself to a retry).
_RELEASE = (
    _COMMON
    + """
local record = read(KEYS[1])
if record.lease_owner == ARGV[1] then
  drop(record, {'lease_owner', 'lease_until'})
  if hashes[KEYS[1]] then
    redis.call('HDEL', KEYS[1], 'lease_owner', 'lease_until')
  else
    redis.call('SET', KEYS[1], cjson.encode(record), 'KEEPTTL')
  end
  return 1
end
return 0
"""
)

# KEYS[1] record; ARGV: ttl, now, job id. A queued or retrying job is cancelled at once; a started
# one is flagged and told over pub/sub so its worker stops generating. Returns the state after.
_CANCEL = (
    _COMMON
    + """
local record = read(KEYS[1])
local cur = record.state
if not cur then return '' end
if rank[cur] == FINISHED then return cur end
local change = {'cancel_requested', '1', 'updated_at', ARGV[2]}
if cur == 'queued' or cur == 'retrying' then
  add(change, 'state', 'cancelled', 'finished_at', ARGV[2])
  cur = 'cancelled'
end
set(record, change)
local json = write(KEYS[1], record, ARGV[1])
if cur == 'cancelled' then
  publish(json, '"""
    + EVENTS_CHANNEL
    + """')
end
redis.call('PUBLISH', '"""
    + CANCEL_CHANNEL
    + """', ARGV[3])
return cur
"""
)


class Claim(NamedTuple):
    """How one delivery's claim on a job went: the state after it, the attempts counted so far, and
    `leased_s` > 0 when another run holds the job's lease for that many more seconds (not run, not counted)."""

    state: JobState | None
    attempts: int
    leased_s: float = 0.0


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def decode_record(raw: str | bytes | None) -> dict[str, str]:
    """A record as stored (JSON of string fields) -> its fields; {} for none, or for what is no record."""
    if not raw:
        return {}
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in record.items()} if isinstance(record, dict) else {}


def is_wrong_type(exc: redis.ResponseError) -> bool:
    """Whether a GET failed on a key of another type: a record of the hash layout (before 2026-12-06)."""
    return str(exc).startswith("WRONGTYPE")


def record_to_status(record: dict[str, str]) -> JobStatus:
    """A record as read from Redis (or as an event carries it) -> its JobStatus; fields it does not name
    (`owner`, the lease, flags) stay in the record."""
    data: dict[str, Any] = {k: v for k, v in record.items() if v != ""}
    if "error" in data:
        data["error"] = ErrorInfo.model_validate_json(data["error"])
    return JobStatus.model_validate(data)


def owned_status(record: dict[str, str], owner: str | None) -> JobStatus | None:
    """`record`'s status when it exists and `owner` (None: anyone) submitted it."""
    if not record or (owner is not None and record.get("owner") != owner):
        return None
    return record_to_status(record)


class CountingPubSub(redis.client.PubSub):
    """A subscription that counts its connections. redis-py reconnects and subscribes again on its own when a
    read fails and a retry succeeds; what was published in between is lost, so a wait reads the records
    again when this count moves (`EventFeed.resubscribed`) instead of re-reading them every second."""

    connects = 0

    def on_connect(self, connection: Any) -> None:
        self.connects += 1
        super().on_connect(connection)


class EventFeed:
    """The events channel, subscribed (sync): each status published there, as `StatusStore.events` opens it."""

    def __init__(self, client: redis.Redis) -> None:
        self._pubsub = CountingPubSub(client.connection_pool, ignore_subscribe_messages=True)
        self._pubsub.subscribe(EVENTS_CHANNEL)
        self._connects = self._pubsub.connects
        self._ready: deque[JobStatus] = deque()  # the rest of a message that carried several

    def resubscribed(self) -> bool:
        """Whether the subscription reconnected since the last call (events published meanwhile are lost)."""
        seen, self._connects = self._connects, self._pubsub.connects
        return self._connects != seen

    def next(self, timeout_s: float) -> JobStatus | None:
        """The next status published, or None: nothing within `timeout_s`, or a message that is no status."""
        if not self._ready:
            message = self._pubsub.get_message(timeout=max(0.0, timeout_s))
            if message is not None:
                self._ready.extend(parse_events(message["data"]))
        return self._ready.popleft() if self._ready else None

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):  # closing a feed whose Redis went away is no error
            self._pubsub.close()


class StatusStore:
    """The status records (sync): created by the Client, moved on by workers, read by anyone."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl
        self._transition = client.register_script(_TRANSITION)
        self._begin = client.register_script(_BEGIN)
        self._cancel = client.register_script(_CANCEL)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._ended = threading.local()  # the job this thread last moved to a terminal state, since its last claim
        # Claims and transitions from many threads at once share one script call (tasks/group_commit.py); the 2 ms
        # linger gathers the jobs of one engine batch, whose threads end a little apart.
        self._claims: GroupCommit[list[str], tuple[str, int, str]] = GroupCommit(self._claim_many, linger_s=LINGER_S)
        self._moves: GroupCommit[tuple[str, list[str]], tuple[int, str]] = GroupCommit(
            self._transition_many, linger_s=LINGER_S
        )

    def key(self, job_id: str) -> str:
        return keys.job(job_id)

    def create(self, job_id: str, task: str, *, owner: str | None = None, **fields: str) -> None:
        """A queued job's record. `owner`: who submitted it (the gateway's API key id), for `get_owned`."""
        now = now_iso()
        record = {"job_id": job_id, "state": JobState.QUEUED.value, "task": task, "attempts": "0",
                  "created_at": now, "updated_at": now, **fields}  # fmt: skip
        if owner:
            record["owner"] = owner
        # One command, the TTL with it; a submit that fails later deletes the record again (`Client._forget`).
        self.redis.set(self.key(job_id), json.dumps(record, separators=(",", ":")), ex=self.ttl)

    def delete(self, job_id: str) -> None:
        self.redis.delete(self.key(job_id))

    def record(self, job_id: str) -> dict[str, str]:
        key = self.key(job_id)
        try:
            return decode_record(self.redis.get(key))
        except redis.ResponseError as exc:
            if not is_wrong_type(exc):
                raise
            return self.redis.hgetall(key)  # the hash layout (a rolling upgrade)

    def get(self, job_id: str) -> JobStatus | None:
        record = self.record(job_id)
        return record_to_status(record) if record else None

    def state(self, job_id: str) -> JobState | None:
        """Only the job's state (a check before a write needs no more than this)."""
        state = self.record(job_id).get("state")
        return JobState(state) if state else None

    def get_owned(self, job_id: str, owner: str | None) -> JobStatus | None:
        """The status if the job exists and `owner` submitted it (None: anyone's); else None, the same answer
        as for an unknown job, so ids cannot be probed across owners."""
        return owned_status(self.record(job_id), owner)

    def get_many(self, job_ids: list[str]) -> dict[str, JobStatus | None]:
        """Several records in one command (MGET)."""
        if not job_ids:
            return {}
        raws = self.redis.mget([self.key(j) for j in job_ids])
        records = [decode_record(raw) for raw in raws]
        if absent := [i for i, raw in enumerate(raws) if raw is None]:
            # MGET answers None for a key of another type too: a record of the hash layout, or none at all.
            with self.redis.pipeline(transaction=False) as pipe:
                for i in absent:
                    pipe.hgetall(self.key(job_ids[i]))
                for i, record in zip(absent, pipe.execute(), strict=True):
                    records[i] = record
        return {j: record_to_status(r) if r else None for j, r in zip(job_ids, records, strict=True)}

    def transition(
        self,
        job_id: str,
        state: JobState,
        *,
        error: ErrorInfo | None = None,
        recreate_task: str | None = None,
        **fields: str,
    ) -> bool:
        """Move forward to `state`; False (and nothing written) when that would go backwards.

        With `recreate_task`, a terminal move whose record has vanished (Redis lost it) makes it anew:
        job id, task, the terminal state and its fields, so pollers and webhooks still see the end.
        """
        if error is not None:
            fields["error"] = error.model_dump_json()
        if recreate_task is not None:
            fields = {"job_id": job_id, "task": recreate_task, **fields}
        args: list[str] = [state.value, str(self.ttl), now_iso(), "1" if recreate_task is not None else "0"]
        for name, value in fields.items():
            args += [name, value]
        changed, _ = self._moves.call((self.key(job_id), args))
        if changed and state.finished:
            self._ended.job_id = job_id
        return bool(changed)

    def lease_ended_here(self, job_id: str) -> bool:
        """Whether this thread, since its last `claim`, moved `job_id` to a terminal state: that step deleted the
        job's lease, so there is none left to release."""
        return getattr(self._ended, "job_id", None) == job_id

    def begin_attempt(self, job_id: str, worker: str, max_attempts: int) -> tuple[JobState, int]:
        """Count a delivery without a lease (see `claim`)."""
        claim = self.claim(job_id, worker, max_attempts, token="", lease_s=0.0)
        assert claim.state is not None  # no lease token: never told to wait
        return claim.state, claim.attempts

    def claim(self, job_id: str, worker: str, max_attempts: int, token: str, lease_s: float) -> Claim:
        """Count this delivery and start the job under `token`'s lease (`lease_s` long), unless another lease
        still lives. An empty token counts the delivery without taking a lease (`begin_attempt`)."""
        self._ended.job_id = None  # a new run of this thread: its lease is not ended yet
        poison = ErrorInfo(
            type="PoisonMessageError",
            message=f"job was delivered more than {max_attempts} times without finishing "
            "(a worker crashed or ran out of memory on it)",
        )
        args = [max_attempts, self.ttl, now_iso(), worker, poison.model_dump_json(), job_id, token, lease_s]
        state, attempts, left = self._claims.call([self.key(job_id), *map(str, args)])
        if state == "leased":
            return Claim(None, int(attempts), max(float(left), 0.001))
        return Claim(JobState(state), int(attempts))

    def _claim_many(self, items: list[list[str]]) -> list[tuple[str, int, str]]:
        """One script call for the claims of many threads: each item is its record's key, then its arguments."""
        flat = self._begin(keys=[item[0] for item in items], args=_per_job([item[1:] for item in items]))
        return [(str(flat[i]), int(flat[i + 1]), str(flat[i + 2])) for i in range(0, len(flat), 3)]

    def _transition_many(self, items: list[tuple[str, list[str]]]) -> list[tuple[int, str]]:
        """One script call for the transitions of many threads: (record key, arguments) each."""
        flat = self._transition(keys=[key for key, _ in items], args=_per_job([args for _, args in items]))
        return [(int(flat[i]), str(flat[i + 1])) for i in range(0, len(flat), 2)]

    def renew_leases(self, leases: dict[str, str], lease_s: float) -> int:
        """Extend the leases of running jobs (job id -> token) for `lease_s` more seconds; how many were."""
        if not leases:
            return 0
        ids = list(leases)
        return int(self._renew(keys=[self.key(j) for j in ids], args=[lease_s, self.ttl, *(leases[j] for j in ids)]))

    def release_lease(self, job_id: str, token: str) -> None:
        self._release(keys=[self.key(job_id)], args=[token])

    def request_cancel(self, job_id: str) -> JobState | None:
        state = self._cancel(keys=[self.key(job_id)], args=[self.ttl, now_iso(), job_id])
        return JobState(state) if state else None

    def cancel_requested(self, job_id: str) -> bool:
        return self.record(job_id).get("cancel_requested") == "1"

    def events(self) -> EventFeed:
        """Subscribe to every status change; subscribe before reading records, so no change slips between."""
        return EventFeed(self.redis)

    def mark_terminal_webhook(self, job_id: str) -> None:
        """Note that the job's terminal webhook was queued: a later delivery of the finished job sends it only
        when this mark is missing (the run that ended the job died before queueing it). A key of its own, one
        SET with the record's TTL: in the record it would take a script's read and write."""
        self.redis.set(keys.terminal_webhook(job_id), "1", ex=self.ttl)

    def terminal_webhook_sent(self, job_id: str) -> bool:
        """Whether a run already queued the job's terminal webhook (`mark_terminal_webhook`)."""
        return bool(self.redis.exists(keys.terminal_webhook(job_id)))

    # An idempotency key's value is "{job_id}:{request fingerprint}" (job ids hold no colon); a value of a
    # job id alone (written before fingerprints were kept) matches any request.
    def claim_idempotency_key(self, key: str, job_id: str, fingerprint: str | None = None) -> str:
        """The job id already bound to `key`, or `job_id` after binding it with the request's `fingerprint`
        (atomic SET NX). IdempotencyKeyReused when `key` is bound to a request of another fingerprint."""
        name = keys.idempotency(key)
        if self.redis.set(name, f"{job_id}:{fingerprint}" if fingerprint else job_id, nx=True, ex=self.ttl):
            return job_id
        first, _, stored = (self.redis.get(name) or job_id).partition(":")
        if fingerprint and stored and stored != fingerprint:
            raise IdempotencyKeyReused(first)
        return first

    def idempotency_conflicts(self, claims: list[tuple[str, str]]) -> list[str | None]:
        """For each (key, fingerprint): the job id its key is bound to when that job's request was another
        one, else None. One round trip; `claim_idempotency_key` checks again when it binds."""
        if not claims:
            return []
        stored = self.redis.mget([keys.idempotency(key) for key, _ in claims])
        conflicts: list[str | None] = []
        for (_, fingerprint), value in zip(claims, stored, strict=True):
            first, _, bound = (value or "").partition(":")
            conflicts.append(first if bound and bound != fingerprint else None)
        return conflicts

    def release_idempotency_key(self, key: str, job_id: str) -> None:
        name = keys.idempotency(key)
        if (self.redis.get(name) or "").partition(":")[0] == job_id:
            self.redis.delete(name)


def _per_job(args: list[list[str]]) -> list[str]:
    """A batch script's ARGV (`each` in the scripts): each job's argument count, then its arguments."""
    return [x for job in args for x in (str(len(job)), *job)]


def parse_events(message: str) -> list[JobStatus]:
    """The statuses one message on `varco:events` carries: a record, or a JSON array of the records one script
    changed together (a worker's batch). Items that are no status are skipped (anyone may publish there)."""
    try:
        data = json.loads(message)
    except (ValueError, TypeError):
        return []
    statuses = [_status_of(item) for item in (data if isinstance(data, list) else [data])]
    return [s for s in statuses if s is not None]


def _status_of(item: Any) -> JobStatus | None:
    try:
        return record_to_status(item)
    except (ValueError, TypeError, AttributeError):  # AttributeError: JSON that is no object, e.g. `1`
        return None
