"""The result cache (VARCO_RESULT_CACHE_TTL): a repeat job is answered from an earlier result, no engine.

A job repeats an earlier one when its image bytes (sha256), task, prompt, region, label, generation
budget (`max_new_tokens`, the default filled in) and model all equal those of a result stored within
the TTL. The index lives in Redis: `varco:cache:{sha256 of those fields}` (`tasks/keys.py`) -> the source job's id and
result URI, written with the TTL when a job's result is stored. Only results made by the engine are
indexed, so `cached_from` always names the job that ran inference. A lookup that cannot read its
source (deleted, unreadable, older than the TTL) is a miss; nothing here ever fails a job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime

import redis
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ValidationError

from varco.tasks import keys
from varco.tasks.requests import JobRequest
from varco.tasks.results_store import ResultStore
from varco.tasks.schemas import JobResult
from varco.tasks.settings import Settings
from varco.tasks.tag_grammar import constraint_for
from varco.workers import metrics

log = logging.getLogger(__name__)


class CacheEntry(BaseModel):
    job_id: str
    result_uri: str


class ResultCache:
    def __init__(self, client: redis.Redis, store: ResultStore, settings: Settings) -> None:
        self.redis, self.store, self.settings = client, store, settings

    @property
    def enabled(self) -> bool:
        return self.settings.result_cache_ttl > 0

    def key(self, request: JobRequest, image_sha256: str) -> str:
        fields = {
            "model": self.settings.model,
            "image_sha256": image_sha256,
            "task": request.task.value,
            "prompt": request.prompt,
            "region": list(request.region) if request.region else None,
            "label": request.label,
            "max_new_tokens": request.max_new_tokens or self.settings.max_new_tokens,
            # A constrained and a free answer to the same question may differ.
            "constraint": constraint_for(request.task, request.constrained, self.settings.constrained_tags),
        }
        return keys.result_cache(hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest())

    def lookup(self, request: JobRequest, image_sha256: str) -> JobResult | None:
        """The stored result this job repeats, or None (cache off, no entry, expired or unreadable)."""
        if not self.enabled:
            return None
        raw = self.redis.get(self.key(request, image_sha256))
        source = self._read(raw) if raw else None
        metrics.RESULT_CACHE.labels(outcome="hit" if source else "miss").inc()
        return source

    def _read(self, raw: str | bytes) -> JobResult | None:
        try:
            entry = CacheEntry.model_validate_json(raw)
            source = JobResult.model_validate_json(self.store.read(entry.result_uri))
        except (ValidationError, ValueError, OSError, ClientError, BotoCoreError) as exc:
            # A deleted result (FileNotFoundError, S3's NoSuchKey), or one that no longer parses.
            log.info("result cache entry not usable: %r", exc)
            return None
        finished = source.finished_at
        # Redis expires entries after the TTL; this also ignores entries left from a longer TTL.
        if finished is None or (datetime.now(UTC) - finished).total_seconds() > self.settings.result_cache_ttl:
            return None
        return source

    def remember(self, request: JobRequest, image_sha256: str, job_id: str, result_uri: str) -> None:
        """Index a result the engine made, for the TTL. Best effort: the job has already succeeded."""
        if not self.enabled:
            return
        entry = CacheEntry(job_id=job_id, result_uri=result_uri).model_dump_json()
        try:
            self.redis.set(self.key(request, image_sha256), entry, ex=self.settings.result_cache_ttl)
        except redis.RedisError as exc:
            log.warning("job %s: result not added to the cache: %r", job_id, exc)
