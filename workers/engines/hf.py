"""The hf backend: transformers' `generate` in batches, driven by one engine thread that owns the device.

Task threads `prepare` (processor) and `submit`; the engine thread waits up to `max_wait_ms` after
the oldest request arrived for class mates (see `hf_batching`), runs one `generate`, and resolves
each request's own future. Cancelled requests are dropped before a batch starts and stopped between
decode steps by a stopping criterion. A CUDA out-of-memory error splits the batch and lowers the
batch token cap; any other failure of a whole batch reruns its requests one by one, so a single bad
request cannot fail its batch mates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from varco.workers import metrics
from varco.workers.engines.base import (
    Cancelled,
    GenerationOutput,
    GenerationRequest,
    ThreadedEngine,
    WorkItem,
    never_cancelled,
)
from varco.workers.engines.deltas import DeltaDecoder, OnDelta
from varco.workers.engines.hf_batching import BatchPolicy
from varco.workers.engines.hf_model import HFModel, PreparedRequest

log = logging.getLogger(__name__)


class _Item(WorkItem):
    prepared: PreparedRequest

    @property
    def budget(self) -> int:
        return self.prepared.request.max_new_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.prepared.prompt_tokens


class _CancelRows(StoppingCriteria):
    """Marks a row finished once its job is cancelled; generate stops when every row is.

    Runs once per decode step, so it also reports the engine's progress to health checks.
    """

    def __init__(self, checks: list[Callable[[], bool]], on_step: Callable[[], None]) -> None:
        self.checks = checks
        self.on_step = on_step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        self.on_step()
        return torch.tensor([check() for check in self.checks], dtype=torch.bool, device=input_ids.device)


class _StreamRows(StoppingCriteria):
    """Hands each streamed row's ids so far to its delta decoder after every decode step; never stops a row.

    Added only to batches with a streamed request. The ids are copied to the host for those rows alone."""

    def __init__(self, decoders: list[DeltaDecoder | None]) -> None:
        self.rows = [(row, d) for row, d in enumerate(decoders) if d is not None]
        self.start: int | None = None  # the prompt's (padded) length: one token is new at the first call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        generated = input_ids[[row for row, _ in self.rows], self.start :].tolist()
        for (_, decoder), ids in zip(self.rows, generated, strict=True):
            decoder.update(ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class HFEngine(ThreadedEngine):
    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_batch_size: int = 8,
        max_wait_ms: int = 20,
        max_batch_tokens: int = 65536,
        hf_model: HFModel | None = None,
    ) -> None:
        super().__init__(model)
        self.model = hf_model or HFModel(model, dtype=dtype, hooks=self.hooks)
        self.model.hooks = self.hooks
        self.policy = BatchPolicy(max_batch_size, max_batch_tokens)
        self.max_wait_s = max_wait_ms / 1000

    def load(self) -> HFEngine:
        if self._thread is None:
            started = time.perf_counter()
            self.model.load()
            self.device = str(getattr(self.model, "device", "cpu"))
            self.load_seconds = getattr(self.model, "load_seconds", 0.0) or time.perf_counter() - started
            self._start_thread()
        return self

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        return self.model.prepare(request)

    def submit(
        self, prepared: PreparedRequest, is_cancelled: Callable[[], bool] = never_cancelled,
        on_delta: OnDelta | None = None,
    ) -> Future:  # fmt: skip
        return self._enqueue(_Item(prepared, is_cancelled, self._deltas(prepared, on_delta)))

    def _tokenizer(self) -> Any:
        return self.model.processor.tokenizer

    def _stop_ids(self) -> list[int]:
        return self.model.stop_ids

    def stop(self) -> None:
        self._fail(self._stop_thread(timeout=30), "the engine stopped before running this request")

    # --- engine thread --------------------------------------------------------------------
    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while True:
                if self._stopping and not self._inbox:
                    return None
                if self._inbox:
                    wait = self._inbox[0].arrived + self.max_wait_s - time.monotonic()
                    if wait <= 0 or self._stopping or self.policy.full(self._inbox):
                        chosen = set(self.policy.select(self._inbox))
                        batch = [item for i, item in enumerate(self._inbox) if i in chosen]
                        self._inbox = [item for i, item in enumerate(self._inbox) if i not in chosen]
                        return batch
                    self._cond.wait(timeout=wait)
                else:
                    self._cond.wait()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run_batch(batch)
            except Exception as exc:  # never let the engine thread die: fail this batch, keep serving
                log.exception("engine thread: batch failed outside generate")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)

    def _run_batch(self, batch: list[_Item]) -> None:
        live = []
        for item in batch:
            if item.is_cancelled():
                item.future.set_exception(Cancelled())
            elif item.future.set_running_or_notify_cancel():
                live.append(item)
        if live:
            self._generate_or_split(live)

    def _generate_or_split(self, items: list[_Item]) -> None:
        try:
            outputs = self._generate(items)
        except Exception as exc:
            if len(items) == 1:
                items[0].future.set_exception(exc)
                return
            if is_out_of_memory(exc):
                self.policy.out_of_memory(items)
                log.warning(
                    "out of memory on a batch of %d; splitting it, batch token cap now %d",
                    len(items), self.policy.max_batch_tokens,
                )  # fmt: skip
                _free_cuda_cache()
                half = len(items) // 2
                self._generate_or_split(items[:half])
                self._generate_or_split(items[half:])
                return
            log.warning("batch of %d failed (%r); running its requests one by one", len(items), exc)
            for item in items:
                self._generate_or_split([item])
            return
        for item, output in zip(items, outputs, strict=True):
            if item.is_cancelled():
                item.future.set_exception(Cancelled())
            else:
                item.future.set_result(output)

    def _generate(self, items: list[_Item]) -> list[GenerationOutput]:
        metrics.BATCH_SIZE.observe(len(items))
        criteria = StoppingCriteriaList([_CancelRows([i.is_cancelled for i in items], self.note_progress)])
        if any(i.deltas is not None for i in items):
            criteria.append(_StreamRows([i.deltas for i in items]))
        started = time.perf_counter()
        self.in_flight = len(items)
        try:
            prepared = [i.prepared for i in items]
            return self._traced(items, lambda: self.model.generate(prepared, stopping_criteria=criteria))
        finally:
            self.in_flight = 0
            self.note_progress()
            metrics.ENGINE_BUSY.inc(time.perf_counter() - started)


def _free_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
