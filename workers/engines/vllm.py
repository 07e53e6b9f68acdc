"""The vllm backend: vLLM's V1 `LLMEngine` with continuous batching, driven by one engine thread.

Requests join the running batch as they arrive (no batch boundaries), each with its own exact
`max_tokens`; a cancelled job is aborted between steps, which frees its KV cache at once. Prefix
caching is on, and images are keyed by their content hash, so several tasks on one image reuse its
encoder output and its prompt prefix. Tokens are decoded once per request at the end, with the
VARCO tags kept and no spaces between them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from varco.tasks import tracing
from varco.workers import metrics
from varco.workers.engines.base import (
    Cancelled,
    GenerationOutput,
    GenerationRequest,
    ThreadedEngine,
    WorkItem,
    cuda_available,
    end_generation_span,
    never_cancelled,
    user_turn,
    weights_dtype,
)
from varco.workers.engines.decode import stop_token_ids, to_output
from varco.workers.engines.deltas import OnDelta

log = logging.getLogger(__name__)


@dataclass
class VLLMPrepared:
    request: GenerationRequest
    prompt: dict[str, Any]  # vLLM's prompt dict: text with the image placeholder, the image, its id


class VLLMEngine(ThreadedEngine):
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model)
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.extra_engine_args = dict(engine_args or {})
        self.engine: Any = None
        self.tokenizer: Any = None
        self._running: dict[str, WorkItem] = {}  # request id -> item, engine thread only
        self._spans: dict[str, Any] = {}  # request id -> its open varco.generate span (tracing on only)
        self._ready = threading.Event()
        self._load_lock = threading.Lock()
        self._load_error: BaseException | None = None

    # --- set-up -------------------------------------------------------------------------------
    def engine_args(self) -> Any:
        from vllm.engine.arg_utils import EngineArgs

        from varco.workers.engines.vllm_tag_constraint import PROCESSOR as TAG_CONSTRAINT_PROCESSOR

        args: dict[str, Any] = {
            "model": self.model_name,
            "dtype": weights_dtype(self.dtype),  # as the hf backend's
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_seqs": self.max_num_seqs,
            "enable_prefix_caching": True,
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            # The plugins' processors (scripted answers) first, then the tag constraint (issue 22).
            "logits_processors": [*self.hooks.vllm_logits_processors, TAG_CONSTRAINT_PROCESSOR],
            "disable_log_stats": True,
        }
        if self.max_model_len:
            args["max_model_len"] = self.max_model_len
        if not cuda_available() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            args["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(self.gpu_memory_utilization)
        args.update(self.extra_engine_args)
        return EngineArgs(**args)

    def load(self) -> VLLMEngine:
        """Build the engine on the engine thread and wait until it is ready (or failed)."""
        with self._load_lock:
            if self.engine is not None:
                return self
            return self._load()

    def _load(self) -> VLLMEngine:
        started = time.perf_counter()
        self._start_thread()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        self.load_seconds = time.perf_counter() - started
        log.info("vLLM engine for %s ready in %.1fs", self.model_name, self.load_seconds)
        return self

    def _build(self) -> None:
        # Built on the thread that steps it: on CPU, torch's OpenMP threads then belong to one
        # thread, and steps run ~1.8x faster than when another thread created the engine.
        from vllm import LLMEngine

        try:
            self.engine = LLMEngine.from_engine_args(self.engine_args())
            self.tokenizer = self.engine.get_tokenizer()
            self.stop_ids = stop_token_ids(self.tokenizer, self._generation_eos())
            self.device = "cuda" if cuda_available() else "cpu"
        except BaseException as exc:
            self._load_error = exc
            raise
        finally:
            self._ready.set()

    def _generation_eos(self) -> Any:
        """The EOS ids of the model's generation config, which vLLM stops on too."""
        config = getattr(self.engine, "model_config", None)
        return config.try_get_generation_config().get("eos_token_id") if config is not None else None

    def chat_text(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template(user_turn(prompt), add_generation_prompt=True, tokenize=False)

    def prepare(self, request: GenerationRequest) -> VLLMPrepared:
        if self.engine is None:
            raise RuntimeError("the vLLM engine is not loaded: call load() first")
        prompt: dict[str, Any] = {
            "prompt": self.chat_text(request.prompt),
            "multi_modal_data": {"image": request.image},
        }
        if request.image_id:
            prompt["multi_modal_uuids"] = {"image": [request.image_id]}
        return VLLMPrepared(request, prompt)

    def sampling_params(self, request: GenerationRequest, *, streamed: bool = False) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from varco.workers.engines.vllm_tag_constraint import request_args as tag_constraint_args

        extra: dict[str, Any] = {}
        for hook in self.hooks.vllm_request_args:
            extra.update(hook(request) or {})
        if request.constraint is not None:
            extra.update(tag_constraint_args(request.constraint, self.stop_ids))
        return SamplingParams(
            temperature=0.0,
            max_tokens=request.max_new_tokens,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            detokenize=False,  # decoded once at the end, the same way as the hf backend
            # Per-step outputs (the ids so far) for streamed requests alone; others report when finished.
            output_kind=RequestOutputKind.CUMULATIVE if streamed else RequestOutputKind.FINAL_ONLY,
            extra_args=extra or None,
        )

    # --- task threads -------------------------------------------------------------------------
    def pending(self) -> int:
        return len(self._inbox) + len(self._running)

    def submit(
        self, prepared: VLLMPrepared, is_cancelled: Callable[[], bool] = never_cancelled,
        on_delta: OnDelta | None = None,
    ) -> Future:  # fmt: skip
        return self._enqueue(WorkItem(prepared, is_cancelled, self._deltas(prepared, on_delta)))

    def _tokenizer(self) -> Any:
        return self.tokenizer

    def _stop_ids(self) -> list[int]:
        return self.stop_ids

    def stop(self) -> None:
        left = self._stop_thread(timeout=60)
        self._fail([*left, *self._running.values()], "the engine stopped before finishing this request")
        self._running.clear()
        engine, self.engine = self.engine, None
        if engine is not None:
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()  # ends the engine core's child processes, if it has any

    # --- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._build()
        except BaseException:
            return  # load() raises the error in the caller
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._running and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        return
                    arrived, self._inbox = self._inbox, []
                for item in arrived:
                    self._add(item)
                self._abort_cancelled()
                if self.engine.has_unfinished_requests():
                    metrics.BATCH_SIZE.observe(len(self._running))
                    started = time.perf_counter()
                    outputs = self.engine.step()
                    metrics.ENGINE_BUSY.inc(time.perf_counter() - started)
                    self.note_progress()
                    for output in outputs:
                        if output.finished:
                            self._finish(output)
                        elif (item := self._running.get(output.request_id)) is not None and item.deltas:
                            item.deltas.update(output.outputs[0].token_ids)
        except BaseException as exc:  # the engine is broken: fail what it holds, refuse new work
            log.exception("vLLM engine thread died")
            with self._cond:
                self._dead = exc
                items = [*self._inbox, *self._running.values()]
                self._inbox, self._running = [], {}
            self._fail(items, f"the vLLM engine died: {exc!r}")

    def _add(self, item: WorkItem) -> None:
        if item.is_cancelled():
            item.future.set_exception(Cancelled())
            return
        if not item.future.set_running_or_notify_cancel():
            return
        try:
            params = self.sampling_params(item.prepared.request, streamed=item.deltas is not None)
            self.engine.add_request(item.request_id, item.prepared.prompt, params)
        except Exception as exc:  # a bad request (too long, unreadable image) fails alone
            item.future.set_exception(exc)
            return
        self._running[item.request_id] = item
        if tracing.on():  # continuous batching: the span runs from admission to this request's last token
            self._spans[item.request_id] = self.generation_span(item, len(self._running))

    def _abort_cancelled(self) -> None:
        cancelled = [rid for rid, item in self._running.items() if item.is_cancelled()]
        if cancelled:
            self.engine.abort_request(cancelled)
            for rid in cancelled:
                self._running.pop(rid).future.set_exception(Cancelled())
                self._end_span(rid, error=Cancelled())

    def _finish(self, output: Any) -> None:
        item = self._running.pop(output.request_id, None)
        if item is None:
            return
        completion = output.outputs[0]
        if completion.finish_reason == "abort":
            item.future.set_exception(Cancelled())
            self._end_span(output.request_id, error=Cancelled())
            return
        if item.deltas is not None:  # the last step's text, before the answer is final
            item.deltas.update(completion.token_ids)
        result = to_output(
            completion.token_ids,
            tokenizer=self.tokenizer,
            stop_ids=self.stop_ids,
            prompt_tokens=len(output.prompt_token_ids or []),
            budget=item.prepared.request.max_new_tokens,
        )
        self._end_span(output.request_id, result)
        item.future.set_result(result)

    def _end_span(self, rid: str, output: GenerationOutput | None = None, error: Exception | None = None) -> None:
        if (span := self._spans.pop(rid, None)) is not None:
            end_generation_span(span, output, error)


def cpu_kv_cache_bytes(share: float, total_ram: int | None = None) -> int:
    """On CPU, the KV cache as an explicit share of the machine's RAM.

    vLLM's own CPU default takes the share minus what the process already holds (RSS), so the same
    setting starts in a fresh worker and refuses to start in a process that has grown (a test session,
    a worker that loaded other things first). A fixed size does not depend on that history.
    """
    import psutil

    return int(share * (total_ram if total_ram is not None else psutil.virtual_memory().total))


def configure_cpu_defaults() -> None:
    """On CPU (development), run the engine core in-process and compute on every core.

    In-process start takes ~8 s instead of ~30 s and leaves no engine processes behind; vLLM's CPU
    build otherwise reserves one of the cores. Explicit environment settings win.
    """
    if not cuda_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
