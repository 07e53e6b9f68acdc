"""How the hf backend forms batches: budgets in classes, a token cap, and a cap that learns from OOM.

A static batch runs until its largest budget is spent, so a 1,000-token job would hold the slots of
eight 100-token jobs. Requests are therefore batched only with others of the same budget class
(budgets within a factor of 4), oldest first, and a batch's padded size (rows x (longest prompt +
largest budget), what `generate` allocates KV cache for) stays under a cap. A CUDA out-of-memory
error halves the batch and lowers the cap to half of what failed, for the life of the process; a
request that is alone in its batch is always admitted, so a job that fits alone never fails of OOM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# Classes: budgets up to 64 share one, then one class per factor of 4 (65-256, 257-1024, …).
SMALLEST_CLASS_BUDGET = 64


class Sized(Protocol):
    @property
    def budget(self) -> int: ...

    @property
    def prompt_tokens(self) -> int: ...


def budget_class(budget: int) -> int:
    if budget <= SMALLEST_CLASS_BUDGET:
        return 0
    return math.ceil(math.log(budget / SMALLEST_CLASS_BUDGET, 4))


def padded_tokens(items: Sequence[Sized]) -> int:
    """What one `generate` over these rows holds in its KV cache: every row padded to the longest."""
    if not items:
        return 0
    return len(items) * (max(i.prompt_tokens for i in items) + max(i.budget for i in items))


@dataclass
class BatchPolicy:
    max_batch_size: int
    max_batch_tokens: int

    def select(self, waiting: Sequence[Sized]) -> list[int]:
        """Indices into `waiting` (oldest first) for the next batch: the oldest and its class mates that fit."""
        if not waiting:
            return []
        wanted = budget_class(waiting[0].budget)
        chosen = [0]
        for index in range(1, len(waiting)):
            if len(chosen) >= self.max_batch_size:
                break
            if budget_class(waiting[index].budget) != wanted:
                continue
            if padded_tokens([waiting[i] for i in [*chosen, index]]) > self.max_batch_tokens:
                continue
            chosen.append(index)
        return chosen

    def full(self, waiting: Sequence[Sized]) -> bool:
        """Whether waiting longer cannot grow the next batch, so it may start before the gathering window ends:
        it has `max_batch_size` rows, or a class mate is already left out by the token cap."""
        chosen = self.select(waiting)
        if len(chosen) >= self.max_batch_size:
            return True
        wanted = budget_class(waiting[0].budget)
        return any(budget_class(waiting[i].budget) == wanted for i in range(len(waiting)) if i not in set(chosen))

    def out_of_memory(self, failed: Sequence[Sized]) -> None:
        """Remember that a batch this size did not fit: later batches are at most half of it, the size
        of the halves it is split into (lowering only to just below it would fail again and again)."""
        self.max_batch_tokens = max(1, min(self.max_batch_tokens, padded_tokens(failed) // 2))
