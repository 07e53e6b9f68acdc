"""The fair queue: jobs wait per tenant in Redis; Celery carries anonymous tickets, one per job.

Why tickets: a Celery message that names its job binds the job to the order messages were published in,
and a worker's prefetch then fixes that order further. Here a message says only "run the next job of this
queue". The worker that executes it picks the job at that moment (`pick`), by stride scheduling: each
tenant has a pass value, advanced by 1/weight per job picked; the tenant with queued work and the lowest pass
wins. A tenant that appears (or comes back after idling) starts at the lowest pass of those waiting, so it
gets its share at once and never a burst for the time it was away. Only tenants with queued work take part,
so the scheduling is work-conserving. Within a tenant, priority (0-9, higher first) then submission order.

Exactly once: `pick` binds the ticket's id to the job in the same Lua step that takes it off its tenant's
queue. A ticket delivered again (the worker died; kombu's visibility timeout brought its message back, or a
Celery retry re-published it with the same id) gets the same job, and the status record's lease and attempt
count do the rest as before. `release` drops the binding and the job once its run has ended. Admission
(`VARCO_MAX_QUEUED_PER_TENANT`, `VARCO_MAX_QUEUED`) is checked and the jobs inserted in one Lua step, so
concurrent submitters never overshoot; a batch goes in whole or not at all.

Redis cost per job: one script call to insert (a batch shares one), one to pick, two commands to release, on top of
the ticket's Celery message (what each job's own message cost before); the commands each runs are
accounted for in docs/redis.md#cost-per-job.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from varco.tasks import tracing
from varco.tasks.celery_app import INFER_TASK, broker_priority
from varco.tasks.keys import FAIR_PREFIX
from varco.tasks.status import LUA_CLOCK as _CLOCK  # deadlines on the Redis server's clock, as leases
from varco.tasks.tenants import check_tenant

# Key prefixes (all under keys.FAIR_PREFIX), per Celery queue {q} unless marked global:
TENANT_QUEUE = "{prefix}:{q}:t:{tenant}"  # ZSET job id -> lane * 2^40 + sequence (priority, then FIFO)
ACTIVE_TENANTS = "{prefix}:{q}:active"  # ZSET tenant -> pass, tenants with queued jobs only
IDLE_PASSES = "{prefix}:{q}:pass"  # HASH tenant -> pass it had when its queue ran empty
VIRTUAL_TIME = "{prefix}:{q}:vt"  # the pass the last active tenant was served at: where a tenant joins an empty queue
PICKED = "{prefix}:{q}:picked"  # HASH ticket id -> job id, from pick to release
JOB = "{prefix}:job:{job_id}"  # global HASH: body (the task's args as JSON), queue, tenant, deadline_at
DEPTH = "{prefix}:depth"  # global HASH tenant -> queued jobs, every queue together
SEQUENCE = "{prefix}:seq"  # global counter: submission order
SHED = "{prefix}:shed"  # global HASH tenant -> jobs refused by the limits, ever (a counter for /metrics)

# The keyword a ticket message carries (its value: the queue whose jobs it may pick), and nothing else.
TICKET_ARG = "fair_ticket"


# ARGV: prefix, max per tenant (0: off), max in all (0: off), then per job: id, queue, tenant, lane, deadline
# seconds ('' for none), body. Returns {'ok'} or {'tenant'|'total', tenant, limit, depth} with nothing inserted
# (the refused jobs are then counted per tenant in `shed`).
_INSERT = (
    _CLOCK
    + """
local p = ARGV[1]
local per_tenant, in_all = tonumber(ARGV[2]), tonumber(ARGV[3])
local adds, order, n = {}, {}, 0
for i = 4, #ARGV, 6 do
  local t = ARGV[i + 2]
  if not adds[t] then adds[t] = 0; table.insert(order, t) end
  adds[t] = adds[t] + 1
  n = n + 1
end
local function shed()
  for _, t in ipairs(order) do redis.call('HINCRBY', p .. ':shed', t, adds[t]) end
end
if per_tenant > 0 then
  for _, t in ipairs(order) do
    local d = tonumber(redis.call('HGET', p .. ':depth', t) or '0')
    if d + adds[t] > per_tenant then shed(); return {'tenant', t, per_tenant, d} end
  end
end
if in_all > 0 then
  local total = 0  -- summed from the per-tenant counts: a total counter would cost 2 more commands a job
  for _, d in ipairs(redis.call('HVALS', p .. ':depth')) do total = total + tonumber(d) end
  if total + n > in_all then shed(); return {'total', '', in_all, total} end
end
local now  -- the clock is read only for a job with a deadline
for i = 4, #ARGV, 6 do
  local job, q, t, lane, deadline, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local seq = redis.call('INCR', p .. ':seq')
  local active = p .. ':' .. q .. ':active'
  redis.call('ZADD', p .. ':' .. q .. ':t:' .. t, tonumber(lane) * 1099511627776 + seq, job)
  if not redis.call('ZSCORE', active, t) then
    local lowest = redis.call('ZRANGE', active, 0, 0, 'WITHSCORES')[2]
    local base = tonumber(lowest or redis.call('GET', p .. ':' .. q .. ':vt') or '0')
    local own = tonumber(redis.call('HGET', p .. ':' .. q .. ':pass', t) or base)
    redis.call('ZADD', active, tostring(math.max(base, own)), t)
  end
  if deadline == '' then
    redis.call('HSET', p .. ':job:' .. job, 'body', body, 'queue', q, 'tenant', t)
  else
    now = now or clock()
    redis.call('HSET', p .. ':job:' .. job, 'body', body, 'queue', q, 'tenant', t, 'deadline_at',
               tostring(now + tonumber(deadline)))
  end
end
for _, t in ipairs(order) do redis.call('HINCRBY', p .. ':depth', t, adds[t]) end
return {'ok'}
"""
)

# ARGV: prefix, queue, ticket id, then tenant/weight pairs. Returns {job id, body, tenant, expired (0|1), tenants
# still waiting, counted up to 2 (-1: not a new pick)}, or {} when the queue is empty. A ticket that already holds
# a job gets it again.
_PICK = (
    _CLOCK
    + """
local p, q, ticket = ARGV[1], ARGV[2], ARGV[3]
local picked = p .. ':' .. q .. ':picked'
local now  -- the clock is read only for a job with a deadline
local function expired(deadline)
  if not deadline then return 0 end
  now = now or clock()
  if now > tonumber(deadline) then return 1 end
  return 0
end
local bound = redis.call('HGET', picked, ticket)
if bound then
  local f = redis.call('HMGET', p .. ':job:' .. bound, 'body', 'tenant', 'deadline_at')
  if f[1] then return {bound, f[1], f[2], expired(f[3]), -1} end
  redis.call('HDEL', picked, ticket)
end
local weights = {}
for i = 4, #ARGV, 2 do weights[ARGV[i]] = tonumber(ARGV[i + 1]) end
local active = p .. ':' .. q .. ':active'
while true do
  -- The lowest pass wins; the next two only say whether tenants compete (the `waiting` count, up to 2).
  local top = redis.call('ZRANGE', active, 0, 2, 'WITHSCORES')
  if #top == 0 then return {} end
  local t, pass, waiting = top[1], tonumber(top[2]), math.min(#top / 2, 2)
  local tq = p .. ':' .. q .. ':t:' .. t
  local job = redis.call('ZPOPMIN', tq)[1]
  local f = job and redis.call('HMGET', p .. ':job:' .. job, 'body', 'deadline_at')
  local body = f and f[1]
  local late = 0
  local next_pass = pass
  if body then
    late = expired(f[2])
    if redis.call('HINCRBY', p .. ':depth', t, -1) <= 0 then redis.call('HDEL', p .. ':depth', t) end
    -- An expired job uses no GPU slot: it does not count against its tenant's share.
    if late == 0 then next_pass = pass + 1 / (weights[t] or 1) end
  end
  if redis.call('ZCARD', tq) == 0 then
    redis.call('ZREM', active, t)
    redis.call('HSET', p .. ':' .. q .. ':pass', t, tostring(next_pass))
    if #top < 6 then waiting = waiting - 1 end  -- with 3 or more before, 2 or more are left
    -- vt is read only when no tenant is active, so it is written only when the last one leaves: the pass it
    -- was served at (one SET per emptied queue, not per pick).
    if #top == 2 then redis.call('SET', p .. ':' .. q .. ':vt', tostring(pass)) end
  elseif #top > 2 then
    redis.call('ZADD', active, tostring(next_pass), t)
  end
  -- A tenant alone keeps its pass while it stays alone (one ZADD a pick saved): passes only order tenants
  -- against each other, and one that joins starts at the lowest pass waiting, this one's, as it would have.
  if body then
    redis.call('HSET', picked, ticket, job)
    return {job, body, t, late, waiting}
  end
end
"""
)

# ARGV: prefix, job id. Takes a job that no ticket has picked yet off its tenant's queue (a cancel). Returns
# 1 if it did, 0 if the job is not there, -1 if a ticket has picked it (its worker decides): a job whose hash
# lives but is off its tenant's queue, since a pick takes it off and binds it in one step.
_REVOKE = """
local p, job = ARGV[1], ARGV[2]
local jk = p .. ':job:' .. job
local fields = redis.call('HMGET', jk, 'queue', 'tenant')
local q, t = fields[1], fields[2]
if not q or not t then return 0 end
local tq = p .. ':' .. q .. ':t:' .. t
if redis.call('ZREM', tq, job) == 0 then return -1 end
if redis.call('HINCRBY', p .. ':depth', t, -1) <= 0 then redis.call('HDEL', p .. ':depth', t) end
if redis.call('ZCARD', tq) == 0 then
  local active = p .. ':' .. q .. ':active'
  local pass = redis.call('ZSCORE', active, t)
  if pass then
    redis.call('ZREM', active, t)
    redis.call('HSET', p .. ':' .. q .. ':pass', t, pass)
  end
end
redis.call('DEL', jk)
return 1
"""


class QueueFull(RuntimeError):
    """A submit over VARCO_MAX_QUEUED_PER_TENANT (`tenant` set) or VARCO_MAX_QUEUED (`tenant` None): nothing
    was enqueued. `limit` is the limit, `depth` the jobs already queued against it."""

    def __init__(self, limit: int, depth: int, tenant: str | None = None) -> None:
        self.limit, self.depth, self.tenant = limit, depth, tenant
        scope = f"tenant {tenant!r} has" if tenant else "the queue has"
        setting = "VARCO_MAX_QUEUED_PER_TENANT" if tenant else "VARCO_MAX_QUEUED"
        super().__init__(f"queue full: {scope} {depth} jobs queued; the limit is {limit} ({setting})")


@dataclass(frozen=True)
class QueuedJob:
    """One job to insert: `body` is what its worker receives (the task's args and kwargs), as JSON."""

    job_id: str
    queue: str
    tenant: str
    priority: int  # 0..9, higher sooner
    body: str
    deadline_s: float | None = None


@dataclass(frozen=True)
class Picked:
    """The job a ticket picked: its id, tenant, message body, whether its deadline had passed, and how many
    tenants had queued jobs after the pick, counted up to 2 (-1: the ticket held this job already)."""

    job_id: str
    tenant: str
    body: dict[str, Any]
    expired: bool
    waiting: int = -1

    @property
    def trace(self) -> dict[str, str]:
        """The submitter's trace context carried in the body ({} when it was not traced)."""
        trace = self.body.get("trace")
        return {k: v for k, v in trace.items() if isinstance(v, str)} if isinstance(trace, dict) else {}

    @property
    def task_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The job's arguments, shaped as a job message's `args` and `kwargs`."""
        return tuple(self.body.get("args") or ()), dict(self.body.get("kwargs") or {})


def job_body(job_id: str, request: Mapping[str, Any], enqueued_at: str, trace: Mapping[str, str] | None = None) -> str:
    """The body a worker receives for a job: what its own Celery message carried before tickets, and the
    submitter's trace context (`traceparent`, `tracestate`: tasks/tracing.py) when it was traced."""
    body: dict[str, Any] = {"args": [job_id, dict(request)], "kwargs": {"enqueued_at": enqueued_at}}
    if trace:
        body["trace"] = dict(trace)
    return json.dumps(body)


class FairQueue:
    def __init__(self, client: redis.Redis, weights: Mapping[str, float] | None = None, prefix: str = FAIR_PREFIX):
        self.redis, self.prefix = client, prefix
        self._weights = [str(x) for pair in (weights or {}).items() for x in pair]
        self._insert = client.register_script(_INSERT)
        self._pick = client.register_script(_PICK)
        self._revoke = client.register_script(_REVOKE)

    def insert(self, jobs: Sequence[QueuedJob], *, max_per_tenant: int = 0, max_queued: int = 0) -> None:
        """Queue every job, or none: QueueFull when one limit (0: off) would be passed."""
        if not jobs:
            return
        args: list[Any] = [self.prefix, max_per_tenant, max_queued]
        for job in jobs:
            lane = 9 - job.priority
            deadline = "" if job.deadline_s is None else repr(float(job.deadline_s))
            args += [job.job_id, job.queue, check_tenant(job.tenant), lane, deadline, job.body]
        outcome = self._insert(args=args)
        if outcome[0] != "ok":
            _, tenant, limit, depth = outcome
            raise QueueFull(int(limit), int(depth), tenant or None)

    def pick(self, queue: str, ticket_id: str) -> Picked | None:
        """The job this ticket runs: the one it holds already, else the next by fair share; None: nothing queued."""
        found = self._pick(args=[self.prefix, queue, ticket_id, *self._weights])
        if not found:
            return None
        job_id, body, tenant, expired, waiting = found
        return Picked(job_id, tenant, json.loads(body), bool(int(expired)), int(waiting))

    def release(self, queue: str, ticket_id: str, job_id: str) -> bool:
        """The run of `job_id`, which `pick` gave this ticket, has ended (not handed to a retry): forget the
        binding and the job; True if the ticket held it. Two commands in one write, no script and no read: the
        caller knows the job. Cut off between them, the job's hash stays behind, marked picked (revoke says
        so), never queued again."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(f"{self.prefix}:{queue}:picked", ticket_id)
            pipe.delete(f"{self.prefix}:job:{job_id}")
            unbound, _ = pipe.execute()
        return bool(unbound)

    def revoke(self, job_id: str) -> bool:
        """Take a job that no worker has picked off its queue (a cancel, or a ticket that was never sent).
        True when it is no longer queued (taken off now, or never there); False when a worker has picked it."""
        return int(self._revoke(args=[self.prefix, job_id])) >= 0

    def holds(self, job_ids: Sequence[str]) -> list[bool]:
        """For each job: whether the fair queue has it (queued, or picked and not yet released). A job whose
        status says queued but that the queue does not hold was never inserted: its submitter died between
        the two steps."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(JOB.format(prefix=self.prefix, job_id=job_id))
            return [bool(n) for n in pipe.execute()]

    def picked_by(self, queue: str, job_id: str) -> str | None:
        """The ticket that picked `job_id` and has not released it yet (for tests and tools: reads every binding)."""
        return next((t for t, j in self.redis.hgetall(f"{self.prefix}:{queue}:picked").items() if j == job_id), None)

    def depth(self, tenant: str | None = None) -> int:
        """Jobs queued and not yet picked: one tenant's, or everyone's."""
        if tenant is None:
            return sum(int(n) for n in self.redis.hvals(f"{self.prefix}:depth"))
        return int(self.redis.hget(f"{self.prefix}:depth", tenant) or 0)

    def depths(self) -> dict[str, int]:
        """Jobs queued per tenant (tenants with none are absent)."""
        return {t: int(n) for t, n in self.redis.hgetall(f"{self.prefix}:depth").items() if int(n) > 0}

    def queued_in(self, queue: str) -> int:
        """Jobs of one Celery queue waiting to be picked, every tenant together."""
        tenants = self.redis.zrange(f"{self.prefix}:{queue}:active", 0, -1)
        with self.redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.zcard(f"{self.prefix}:{queue}:t:{tenant}")
            return sum(pipe.execute())

    def shed(self) -> dict[str, int]:
        """Jobs refused by the limits per tenant, since Redis was new (every producer and gateway together)."""
        return {t: int(n) for t, n in self.redis.hgetall(f"{self.prefix}:shed").items()}


def send_ticket(app: Celery, queue: str, ticket_id: str | None = None) -> None:
    """Publish one ticket for `queue` (the default priority: a ticket is nobody's). A job's own ticket takes
    the job's id as its task id, so Celery's tools (`celery control revoke JOB`, Flower) name jobs as before;
    it may still run another job of the queue: which one is the fair queue's choice."""
    app.send_task(INFER_TASK, args=[], kwargs=ticket_kwargs(queue), task_id=ticket_id or uuid.uuid4().hex,
                  queue=queue, priority=broker_priority(None), headers=tracing.inject() or None)  # fmt: skip


def ticket_kwargs(queue: str) -> dict[str, str]:
    """The kwargs of a ticket message for `queue` (its args are empty)."""
    return {TICKET_ARG: queue}


def ticket_queue(args: Iterable[Any], kwargs: Mapping[str, Any]) -> str | None:
    """The queue a message is a ticket for; None for a message that is not a ticket (a job message)."""
    if tuple(args) or set(kwargs) != {TICKET_ARG}:
        return None
    queue = kwargs[TICKET_ARG]
    return queue if isinstance(queue, str) and 0 < len(queue) <= 200 and ":" not in queue else None
