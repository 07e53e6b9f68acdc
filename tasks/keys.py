"""Every Redis key and channel varco-queue uses, named once (like arq's `constants.py`).

No other module spells a key prefix: each record's owner builds its keys with the functions here, and
docs/redis.md lists them (tests/test_docs.py checks the table against this module). Who owns which record
is in docs/architecture.md.
"""

from __future__ import annotations

from varco.tasks.job_ids import check_job_id

JOB_PREFIX = "varco:job:"
"""A job's status record, JSON in a string (`tasks/status.py`); expires VARCO_STATUS_TTL after its last change."""
TERMINAL_WEBHOOK_PREFIX = "varco:terminal-webhook:"
"""A job whose terminal webhook was queued (`tasks/status.py`), for VARCO_STATUS_TTL."""
IDEMPOTENCY_PREFIX = "varco:idem:"
"""An idempotency key -> the first job's id (`tasks/status.py`), for VARCO_STATUS_TTL."""
EVENTS_CHANNEL = "varco:events"
"""Pub/sub: every status change, as the record's JSON, published in the same Lua step (`tasks/status.py`)."""
CANCEL_CHANNEL = "varco:cancel"
"""Pub/sub: the id of a job whose cancel was asked for (`tasks/status.py`); workers stop generating it."""
RESULT_CACHE_PREFIX = "varco:cache:"
"""The result cache index: sha256 of a job's inputs -> the source job and result URI (`output/result_cache.py`)."""
WEBHOOK_DELIVERED_PREFIX = "varco:webhook-delivered:"
"""A webhook id that was delivered, kept VARCO_STATUS_TTL (`output/webhook_delivery.py`)."""
DELTAS_PREFIX = "varco:deltas:"
"""A streamed job's text as generated, a Redis stream capped and expiring with the record (`tasks/delta_stream.py`)."""
FAIR_PREFIX = "varco:fair"
"""The fair queue's keys, all under this prefix: per-tenant job sets, passes, ticket bindings, queued counts
(`tasks/fair_queue.py`, which derives them; docs/tenants.md lists each)."""
BATCH_PREFIX = "varco:batch:"
"""A batch (`varco:batch:{id}`, a hash: the record as JSON and a cancel flag), its job ids in line order
(`…:{id}:jobs`, a list) and its runner's lease (`…:{id}:lease`) (`tasks/batches.py`)."""
BATCHES_ACTIVE = "varco:batches:active"
"""The batches a runner still has work on, a sorted set by creation time (`tasks/batches.py`)."""
BATCHES_BY_OWNER_PREFIX = "varco:batches:owner:"
"""An owner's batches by creation time, for `GET /v1/batches` (`tasks/batches.py`)."""
FILE_PREFIX = "varco:file:"
"""A Batch API file's record, a string of JSON (`tasks/batches.py`); its bytes are in the result store."""
FILES_BY_OWNER_PREFIX = "varco:files:owner:"
"""An owner's files by creation time, for `GET /v1/files` (`tasks/batches.py`)."""

INFER_QUEUE = "varco"
"""Celery's inference queue: a kombu list per priority step, `varco`, `varco:1` … `varco:9`."""
CALLBACK_QUEUE = "varco.callbacks"
"""Celery's webhook queue, consumed by the node's callback process (priority steps as above)."""
CALLBACK_BATCH_QUEUE = "varco.callbacks.batch"
"""Webhook batches (`varco.callback.batch`), consumed by callback processes of a version that knows them: an older
one would drop the unknown task, so batches never go to the queue it reads (a rolling upgrade)."""
DEAD_LETTER_QUEUE = "varco.dead"
"""RabbitMQ only: the quorum queue a message goes to after tasks/brokers.DELIVERY_LIMIT deliveries."""
UNACKED_MESSAGES = "varco:unacked"
"""Unacknowledged Redis-broker messages, each member the message itself, scored by delivery time
(`tasks/redis_transport.py`; re-scored by `runtime/leases.py`, counted by `runtime/fair_pick.py`)."""
UNACKED_INDEX = "unacked_index"
"""kombu's own sorted set of unacknowledged delivery tags (payloads in its `unacked` hash): only a stock
kombu worker writes it now; `tasks/redis_transport.py`'s sweep restores what is left there."""
UNACKED_HASH = "unacked"
"""kombu's hash of unacknowledged payloads by delivery tag, alongside UNACKED_INDEX (stock workers only)."""


def job(job_id: str) -> str:
    """The status record of `job_id`; a malformed id never becomes a key (InvalidJobId)."""
    return JOB_PREFIX + check_job_id(job_id)


def terminal_webhook(job_id: str) -> str:
    """The mark that `job_id`'s terminal webhook was queued."""
    return TERMINAL_WEBHOOK_PREFIX + check_job_id(job_id)


def deltas(job_id: str) -> str:
    """The delta stream of a job submitted with `stream=True`."""
    return DELTAS_PREFIX + check_job_id(job_id)


def idempotency(key: str) -> str:
    return IDEMPOTENCY_PREFIX + key


def result_cache(digest: str) -> str:
    return RESULT_CACHE_PREFIX + digest


def webhook_delivered(webhook_id: str) -> str:
    return WEBHOOK_DELIVERED_PREFIX + webhook_id


def queue_lane(queue: str, step: int) -> str:
    """The Redis list kombu keeps for one priority step of a queue: step 0 is the queue's own name."""
    return queue if step == 0 else f"{queue}:{step}"


def batch(batch_id: str) -> str:
    return BATCH_PREFIX + batch_id


def batch_jobs(batch_id: str) -> str:
    return f"{BATCH_PREFIX}{batch_id}:jobs"


def batch_lease(batch_id: str) -> str:
    return f"{BATCH_PREFIX}{batch_id}:lease"


def batches_by_owner(owner: str) -> str:
    return BATCHES_BY_OWNER_PREFIX + owner


def file(file_id: str) -> str:
    return FILE_PREFIX + file_id


def files_by_owner(owner: str) -> str:
    return FILES_BY_OWNER_PREFIX + owner
