"""The one small interface every engine backend implements, and the types that cross it.

A job's way through a worker reads like vLLM v1's input -> engine -> output split: the task thread
fetches the image and calls `prepare` (tokenising and image preprocessing, off the device's
thread), `submit` hands the prepared request to the engine, which alone drives the device, and the
task thread waits on its own future, then parses and stores. Backends differ only inside `submit`.
"""

from __future__ import annotations

import abc
import contextvars
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from varco.tasks import tracing
from varco.tasks.tag_grammar import OutputShape
from varco.workers.engines.deltas import DeltaDecoder, OnDelta

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class GenerationRequest:
    image: Image.Image
    prompt: str  # the user text; the chat template adds the image before it
    max_new_tokens: int = 1024
    # A content hash of the image (the fetcher's sha256): engines key their image caches on it.
    image_id: str | None = None
    # Constrain the answer to this shape's tag grammar (tasks/tag_grammar.py); None: free decoding.
    constraint: OutputShape | None = None


@dataclass(frozen=True)
class GenerationOutput:
    text: str  # VARCO tags kept, EOS and padding stripped
    prompt_tokens: int
    output_tokens: int
    finish_reason: FinishReason


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (False where torch is not installed)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def weights_dtype(dtype: str, device: str | None = None) -> str:
    """The dtype both backends load weights in: `auto` is bfloat16 on CUDA and float32 on CPU (vLLM's
    own `auto` would halve a float32 checkpoint); any other name as given. `device` defaults to CUDA
    when there is one."""
    if dtype != "auto":
        return dtype
    on_cuda = cuda_available() if device is None else device.startswith("cuda")
    return "bfloat16" if on_cuda else "float32"


def user_turn(prompt: str) -> list[dict[str, Any]]:
    """The conversation both backends template: one user turn, the image before the text (VARCO's order)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


class Cancelled(Exception):
    """The job was cancelled while waiting for or during generation."""


@dataclass
class EngineHooks:
    """Extension points a plugin (`VARCO_ENGINE_PLUGINS`) fills before the engine loads.

    The dev tooling forces the tiny model's answers through them; production leaves them empty.
    """

    # HF: called per batch with its requests and the tokenizer; returns a LogitsProcessor or None.
    hf_logits_processors: list[Callable[[list[GenerationRequest], Any], Any]] = field(default_factory=list)
    # vLLM: logits-processor classes ("module:Class"), importable in vLLM's engine processes.
    vllm_logits_processors: list[str] = field(default_factory=list)
    # vLLM: per-request data for those classes, merged into SamplingParams.extra_args.
    vllm_request_args: list[Callable[[GenerationRequest], dict[str, Any] | None]] = field(default_factory=list)


def never_cancelled() -> bool:
    return False


class EngineBackend(abc.ABC):
    """Loads the model once and generates for requests as they come; one instance per worker process."""

    name: str = "?"

    def __init__(self, model: str) -> None:
        self.model_name = model
        self.hooks = EngineHooks()
        self.load_seconds = 0.0
        self.device = "cpu"

    @abc.abstractmethod
    def load(self) -> EngineBackend:
        """Load weights and start the engine's own thread; idempotent."""

    @abc.abstractmethod
    def prepare(self, request: GenerationRequest) -> Any:
        """Everything that can run before the device is involved; called in the task thread."""

    @abc.abstractmethod
    def submit(
        self, prepared: Any, is_cancelled: Callable[[], bool] = never_cancelled, on_delta: OnDelta | None = None
    ) -> Future[GenerationOutput]:
        """Queue a prepared request; the future raises `Cancelled` once `is_cancelled()` turns true.

        With `on_delta` (streamed jobs only), the engine calls it from its own thread with the answer's
        new text as it generates (`deltas.DeltaDecoder`); the pieces joined are the output's `text`."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the engine and free the device; requests still queued fail."""

    def generate(
        self, request: GenerationRequest, is_cancelled: Callable[[], bool] = never_cancelled
    ) -> GenerationOutput:
        """Prepare, submit and wait: what a task thread does."""
        return self.submit(self.prepare(request), is_cancelled).result()


@dataclass
class WorkItem:
    """One submitted request as the engine thread sees it."""

    prepared: Any
    is_cancelled: Callable[[], bool]
    deltas: DeltaDecoder | None = None  # streamed requests only
    arrived: float = field(default_factory=time.monotonic)
    # Tracing: the submitting job's context (its task thread's), so this request's spans join its own trace
    # whichever job started the batch; and the wall-clock arrival, where its varco.engine_wait span starts.
    trace: Any = field(default_factory=tracing.current_context)
    arrived_ns: int = field(default_factory=time.time_ns)
    waited: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)


def end_generation_span(span: Any, output: GenerationOutput | None = None, error: BaseException | None = None) -> None:
    """End a `generation_span` with the request's token counts, or with its error."""
    if output is not None:
        span.set_attributes({
            "gen_ai.usage.input_tokens": output.prompt_tokens, "gen_ai.usage.output_tokens": output.output_tokens,
            "gen_ai.response.finish_reasons": [output.finish_reason],
        })  # fmt: skip
    if error is not None:
        tracing.record_error(span, error)  # its message redacted as in the logs
    span.end()


class ThreadedEngine(EngineBackend):
    """A backend whose one engine thread owns the device; task threads queue `WorkItem`s for it."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self._inbox: list[Any] = []  # guarded by _cond
        self._cond = threading.Condition()
        self._stopping = False
        self._dead: BaseException | None = None  # set when the engine thread died
        self._thread: threading.Thread | None = None
        self.in_flight = 0  # requests the engine thread is generating for now
        self.last_progress = time.monotonic()  # the last decode step (health checks read it)

    def pending(self) -> int:
        """Requests waiting for or in generation: with no progress for long, the engine is stuck."""
        return len(self._inbox) + self.in_flight

    def note_progress(self) -> None:
        self.last_progress = time.monotonic()

    @abc.abstractmethod
    def _run(self) -> None:
        """The engine thread."""

    def _traced(self, items: list[WorkItem], generate: Callable[[], list[GenerationOutput]]) -> list[GenerationOutput]:
        """Run `generate` for a batch, with each request's spans (`generation_span`) in its own job's trace."""
        if not tracing.on():
            return generate()
        spans = [self.generation_span(item, len(items)) for item in items]
        try:
            outputs = generate()
        except BaseException as exc:
            for span in spans:
                end_generation_span(span, error=exc)
            raise
        for span, output in zip(spans, outputs, strict=False):
            end_generation_span(span, output)
        return outputs

    def generation_span(self, item: WorkItem, batch_size: int) -> Any:
        """A request's `varco.engine_wait` span (once) and its open `varco.generate` span (gen_ai semantic
        conventions), both children of the submitting job's context, whichever job started the batch."""
        now = time.time_ns()
        if not item.waited:  # a batch split after an OOM runs its requests again: they waited once
            tracing.record_span("varco.engine_wait", item.arrived_ns, now, parent=item.trace)
            item.waited = True
        attributes = {
            "gen_ai.operation.name": "chat", "gen_ai.request.model": self.model_name,
            "gen_ai.request.max_tokens": getattr(getattr(item.prepared, "request", None), "max_new_tokens", None),
            "varco.engine": self.name, "varco.batch.size": batch_size,
        }  # fmt: skip
        return tracing.start_span("varco.generate", attributes, parent=item.trace, start_ns=now)

    def _start_thread(self) -> None:
        # The engine thread runs in a copy of the loader's context, so context variables set there
        # (tracing, request-scoped state of a host framework) are visible to the engine's code too.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="engine", daemon=True)
        self._thread.start()

    def _deltas(self, prepared: Any, on_delta: OnDelta | None) -> DeltaDecoder | None:
        """The decoder of a streamed request's deltas; None for every other request (they pay nothing)."""
        if on_delta is None:
            return None
        return DeltaDecoder(on_delta, self._tokenizer(), self._stop_ids(), prepared.request.max_new_tokens)

    def _tokenizer(self) -> Any:
        """The tokenizer that decodes this engine's ids (for streamed requests' deltas)."""
        raise NotImplementedError

    def _stop_ids(self) -> list[int]:
        raise NotImplementedError

    def _enqueue(self, item: WorkItem) -> Future[GenerationOutput]:
        with self._cond:
            if self._stopping or self._dead is not None:
                item.future.set_exception(RuntimeError(f"the engine is not running ({self._dead or 'stopping'})"))
                return item.future
            self._inbox.append(item)
            self._cond.notify()
        return item.future

    def _stop_thread(self, timeout: float) -> list[Any]:
        """Stop the engine thread; returns the items it never took."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=timeout)
        with self._cond:
            left, self._inbox = self._inbox, []
        return left

    @staticmethod
    def _fail(items: Iterable[WorkItem], message: str) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(RuntimeError(message))
