"""A streamed job's text as the model writes it: one Redis stream per job, and this module is its one owner.

`Client.submit(stream=True)` opens the stream (an `open` entry), so its existence says the job streams;
the worker appends each piece of new text (`text` entries) and, when its run ends the job, an `end` entry
with the final state, finish reason and token counts. Readers (`Client.stream`, the gateway's SSE and
chat completion chunks) read from an entry id on, so a reader that comes late or reconnects misses
nothing. Every write caps the stream (MAXLEN, above the largest token budget, so an answer is never cut)
and renews its expiry to the status record's TTL: nothing outlives the job's record.

A job can end without a run writing `end` (cancelled while queued, failed at claim, a worker killed):
readers therefore stop, too, once the job's record says it is finished and the stream has nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from varco.tasks import keys

MAX_ENTRIES = 10_000  # one entry per decode step at most: above the largest budget (8192) and the markers
START = "0-0"  # read from the beginning


@dataclass(frozen=True)
class Delta:
    """New text of the answer, tags kept (the deltas joined are the result's `output.raw`)."""

    id: str
    text: str


@dataclass(frozen=True)
class StreamEnd:
    """The run that ended the job wrote this last: its state and, for an answer, why it ended and its size."""

    id: str
    state: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None


Entry = Delta | StreamEnd


def _entries(raw: Sequence[tuple[str, dict[str, str]]]) -> list[Entry]:
    out: list[Entry] = []
    for entry_id, fields in raw:
        if "text" in fields:
            out.append(Delta(entry_id, fields["text"]))
        elif "end" in fields:
            counts = {k: int(fields[k]) for k in ("prompt_tokens", "output_tokens") if fields.get(k, "").isdigit()}
            out.append(StreamEnd(entry_id, fields["end"], fields.get("finish_reason") or None, **counts))
    return out  # `open` entries carry nothing to read


def _read_args(job_id: str, after: str, block_ms: int | None, count: int | None) -> dict[str, Any]:
    return {"streams": {keys.deltas(job_id): after}, "block": block_ms, "count": count}


def _unpack(answer: Any) -> list[tuple[str, dict[str, str]]]:
    return answer[0][1] if answer else []


class DeltaStream:
    """The sync side: the Client opens and reads, the worker appends and ends. `redis` decodes responses."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis, self.ttl_s = client, ttl_s

    def _add(self, job_id: str, fields: dict[str, str]) -> None:
        key = keys.deltas(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(key, fields, maxlen=MAX_ENTRIES, approximate=True)  # type: ignore[arg-type]
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def open(self, job_id: str) -> None:
        self._add(job_id, {"open": "1"})

    def is_open(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.deltas(job_id)))

    def append(self, job_id: str, text: str) -> None:
        self._add(job_id, {"text": text})

    def end(
        self, job_id: str, state: str, *, finish_reason: str | None = None,
        prompt_tokens: int | None = None, output_tokens: int | None = None,
    ) -> None:  # fmt: skip
        fields = {"end": state, "finish_reason": finish_reason or ""}
        fields |= {k: str(v) for k, v in (("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens)) if v}
        self._add(job_id, fields)

    def text(self, job_id: str) -> str:
        """The text published so far (a retried run publishes only what it adds to it)."""
        return "".join(e.text for e in _entries(self.redis.xrange(keys.deltas(job_id))) if isinstance(e, Delta))

    def read(self, job_id: str, after: str = START, *, block_ms: int | None = None) -> list[Entry]:
        """Entries after `after`; waits up to `block_ms` for one when there are none (None: no wait)."""
        return _entries(_unpack(self.redis.xread(**_read_args(job_id, after, block_ms, None))))


class AsyncDeltaStream:
    """The gateway's side: reads only, without holding a thread."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def is_open(self, job_id: str) -> bool:
        return bool(await self.redis.exists(keys.deltas(job_id)))

    async def read(self, job_id: str, after: str = START, *, block_ms: int | None = None) -> list[Entry]:
        return _entries(_unpack(await self.redis.xread(**_read_args(job_id, after, block_ms, None))))
