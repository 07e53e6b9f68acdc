"""A streamed chat completion's Server-Sent Events: `chat.completion.chunk`s as the model writes the answer.

As OpenAI sends them: a first chunk with the assistant's role, one chunk per piece of text (tags kept, as
the card prints them), a last chunk with the finish reason, with `stream_options.include_usage` a usage
chunk with no choices, then `data: [DONE]`. The pieces come from the job's delta stream (job_deltas.py);
a job that fails after its first chunk ends the stream with an `{"error": ...}` event, which the SDK raises.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta

from varco.gateway.openai_errors import OpenAIError
from varco.tasks.delta_stream import Delta, Entry, StreamEnd
from varco.tasks.schemas import JobState

DONE = b"data: [DONE]\n\n"
# A succeeded job's finish reason and usage, for a stream whose end says neither (the run could not write it).
Usage = tuple[str, CompletionUsage]


@dataclass(frozen=True)
class ChunkStream:
    job_id: str
    model: str
    created: int
    include_usage: bool

    def chunk(self, delta: ChoiceDelta | None, finish_reason: str | None = None, **extra: Any) -> bytes:
        choices = [] if delta is None else [Choice(index=0, delta=delta, finish_reason=finish_reason)]  # type: ignore[arg-type]
        chunk = ChatCompletionChunk(id=f"chatcmpl-{self.job_id}", object="chat.completion.chunk", created=self.created,
                                    model=self.model, choices=choices, **extra)  # fmt: skip
        return b"data: " + chunk.model_dump_json(exclude_unset=True).encode() + b"\n\n"

    async def events(
        self, first: Entry, rest: AsyncIterator[Entry], failed: Callable[[StreamEnd], Awaitable[OpenAIError]],
        usage: Callable[[], Awaitable[Usage]],
    ) -> AsyncIterator[bytes]:  # fmt: skip
        """The whole stream, from the job's first entry on. `failed` makes the error of a job that did not
        succeed; `usage` reads a succeeded job's finish reason and usage from its result when its end lacks them."""
        yield self.chunk(ChoiceDelta(role="assistant", content=""), varco={"job_id": self.job_id})
        entry = first
        while isinstance(entry, Delta):
            yield self.chunk(ChoiceDelta(content=entry.text))
            entry = await anext(rest)
        if entry.state != JobState.SUCCEEDED:
            error = await failed(entry)
            yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
            return
        if entry.finish_reason is not None and entry.output_tokens is not None:
            prompt, completion = entry.prompt_tokens or 0, entry.output_tokens
            finish_reason = entry.finish_reason
            counts = CompletionUsage(prompt_tokens=prompt, completion_tokens=completion,
                                     total_tokens=prompt + completion)  # fmt: skip
        else:
            finish_reason, counts = await usage()
        yield self.chunk(ChoiceDelta(), finish_reason)
        if self.include_usage:
            yield self.chunk(None, usage=counts)
        yield DONE
