"""Dynamic batching: task threads submit requests, one engine thread owns the device.

The engine thread takes the first waiting request, then gathers more for up to `max_wait_ms` or
until `max_batch_size`, and runs them as one `generate`. Each submitter waits on its own future.
Cancelled jobs are dropped before a batch starts and stopped between decode steps by a stopping
criterion, so a cancelled job stops using the GPU. If a whole batch fails, its requests are run
one by one so a single bad request cannot fail its batch mates.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from varco.workers.engine import Engine, GenerationOutput, GenerationRequest

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job was cancelled while waiting for or during generation."""


@dataclass
class _Item:
    request: GenerationRequest
    is_cancelled: Callable[[], bool]
    future: Future = field(default_factory=Future)


class _CancelRows(StoppingCriteria):
    """Marks a row finished once its job is cancelled; generate stops when every row is."""

    def __init__(self, checks: list[Callable[[], bool]]) -> None:
        self.checks = checks

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        return torch.tensor([check() for check in self.checks], dtype=torch.bool, device=input_ids.device)


class Batcher:
    def __init__(self, engine: Engine, max_batch_size: int, max_wait_ms: int) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.batches_run = 0

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest, is_cancelled: Callable[[], bool] = lambda: False) -> Future:
        item = _Item(request, is_cancelled)
        self._queue.put(item)
        return item.future

    def generate(
        self, request: GenerationRequest, is_cancelled: Callable[[], bool] = lambda: False
    ) -> GenerationOutput:
        """Submit and wait; raises Cancelled when the job was cancelled."""
        return self.submit(request, is_cancelled).result()

    # --- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Item]) -> None:
        live = []
        for item in batch:
            if item.is_cancelled():
                item.future.set_exception(Cancelled())
            elif item.future.set_running_or_notify_cancel():
                live.append(item)
        if not live:
            return
        try:
            outputs = self._generate(live)
        except Exception as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            log.warning("batch of %d failed (%r); running its requests one by one", len(live), exc)
            for item in live:
                try:
                    self._finish(item, self._generate([item])[0])
                except Exception as single_exc:
                    item.future.set_exception(single_exc)
            return
        for item, output in zip(live, outputs, strict=True):
            self._finish(item, output)

    def _generate(self, items: list[_Item]) -> list[GenerationOutput]:
        self.batches_run += 1
        criteria = StoppingCriteriaList([_CancelRows([i.is_cancelled for i in items])])
        return self.engine.generate([i.request for i in items], stopping_criteria=criteria)

    @staticmethod
    def _finish(item: _Item, output: GenerationOutput) -> None:
        if item.is_cancelled():
            item.future.set_exception(Cancelled())
        else:
            item.future.set_result(output)
