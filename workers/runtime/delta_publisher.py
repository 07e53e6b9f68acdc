"""Publishes a streamed job's deltas to its Redis stream from the task thread, never from the engine's.

The engine hands each piece of text to `put` (a queue append, on its own thread); the task thread, which
waits for the job's output anyway, `pump`s them to `tasks/delta_stream.py` until the generation is done,
joining the pieces that piled up into one entry. A run that follows a failed attempt publishes only what
its text adds to what the stream already holds, so a reader never sees the answer twice. A Redis failure
stops the publishing (a reader then ends on the job's status) and never fails the job.
"""

from __future__ import annotations

import logging
import queue
from concurrent.futures import Future

from redis.exceptions import RedisError

from varco.tasks.delta_stream import DeltaStream
from varco.workers.engines.base import GenerationOutput
from varco.workers.engines.deltas import extension

log = logging.getLogger(__name__)
_DONE = None


class DeltaPublisher:
    def __init__(self, stream: DeltaStream, job_id: str) -> None:
        self.stream, self.job_id = stream, job_id
        self._pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.generated = ""
        self.published: str | None = None  # read from the stream on the first publish
        self.broken = False

    def put(self, text: str) -> None:
        """The engine's `on_delta`."""
        self._pieces.put(text)

    def pump(self, future: Future) -> None:
        """Publish pieces as they come until `future` is done (then the last of them)."""
        future.add_done_callback(lambda _: self._pieces.put(_DONE))
        done = False
        while not done:
            pieces = [self._pieces.get()]
            while not self._pieces.empty():
                pieces.append(self._pieces.get_nowait())
            done = _DONE in pieces
            self.publish("".join(p for p in pieces if p is not _DONE))

    def publish(self, text: str) -> None:
        """Append `text` to what this run generated, and publish what that adds to the stream."""
        self.generated += text
        if self.broken or not text:
            return
        try:
            if self.published is None:
                self.published = self.stream.text(self.job_id)
            if new := extension(self.published, self.generated):
                self.stream.append(self.job_id, new)
                self.published = self.generated
        except RedisError as exc:
            self.broken = True
            log.warning("job %s: its deltas could not be published (%r); readers end on its status", self.job_id, exc)

    def end(self, state: str, output: GenerationOutput | None) -> None:
        """The run ended the job: the stream's last entry says how, with the answer's finish reason and size."""
        try:
            if output is None:
                self.stream.end(self.job_id, state)
            else:
                self.stream.end(
                    self.job_id, state, finish_reason=output.finish_reason,
                    prompt_tokens=output.prompt_tokens, output_tokens=output.output_tokens,
                )  # fmt: skip
        except RedisError as exc:
            log.warning("job %s: its stream could not be ended (%r); readers end on its status", self.job_id, exc)
