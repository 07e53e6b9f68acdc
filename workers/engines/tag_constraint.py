"""Tag-constrained decoding (issue 22): the grammars of `tasks/tag_grammar.py` compiled with xgrammar, once.

The hf backend masks each constrained row of a batch with `TagGrammarLogits`, an xgrammar
`GrammarMatcher` per row; free rows in the same batch are left alone. (xgrammar's own
`contrib.hf.LogitsProcessor` constrains every row and asserts that each sampled token is accepted,
which the batch's per-row budget breaks: `RowBudget` forces EOS wherever a row's budget ends.) The
vllm backend masks with the same matchers through a per-request logits processor
(`vllm_tag_constraint.py`, over `RowConstraint`); vLLM's own structured outputs were tried and left
(their shared compiler cache conflates token formats: see `TagGrammars.get`).

Tags are `token` formats in the grammar, matched by the special token's id, so the constrained
output holds the tag tokens themselves; the engines decode with `skip_special_tokens=False`.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr
from transformers import LogitsProcessor

from varco.tasks.tag_grammar import OutputShape, structural_tag_json

__all__ = ["CompileStats", "TagGrammarLogits", "TagGrammars"]


@dataclass
class CompileStats:
    """What the cache did in this process: the first job per shape compiles, every later one hits."""

    compiles: int = 0
    cache_hits: int = 0
    compile_seconds: float = 0.0


class TagGrammars:
    """The tag grammars compiled for one tokenizer, cached for the life of the process (one engine)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
        self.vocab_size = vocab_size
        self._compiled: dict[OutputShape, xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()
        self.stats = CompileStats()
        _ALL.add(self)

    def get(self, shape: OutputShape) -> xgr.CompiledGrammar:
        with self._lock:
            if (compiled := self._compiled.get(shape)) is not None:
                self.stats.cache_hits += 1
                return compiled
            started = time.perf_counter()
            # A compiler per shape, its own cache off: xgrammar 0.2.8's compiler cache conflates the token
            # formats of different structural tags (after OCR's, grounding's free text allows <char> where
            # <obj> belongs; pinned by a test). This dict is the per-process cache instead.
            compiler = xgr.GrammarCompiler(self._info, cache_enabled=False)
            compiled = compiler.compile_structural_tag(structural_tag_json(shape))
            self.stats.compile_seconds += time.perf_counter() - started
            self.stats.compiles += 1
            self._compiled[shape] = compiled
            return compiled

    def accepts(self, token_ids: Sequence[int], shape: OutputShape) -> bool:
        """Whether these ids (a whole answer, its stop token last) are a sentence of the grammar."""
        matcher = xgr.GrammarMatcher(self.get(shape))
        return all(matcher.accept_token(int(t)) for t in token_ids) and matcher.is_terminated()


_ALL: weakref.WeakSet[TagGrammars] = weakref.WeakSet()


def process_stats() -> CompileStats:
    """The compile cache's figures over every `TagGrammars` of this process (the bench reads them;
    vLLM's in-process engine core holds its own)."""
    total = CompileStats()
    for grammars in list(_ALL):
        total.compiles += grammars.stats.compiles
        total.cache_hits += grammars.stats.cache_hits
        total.compile_seconds += grammars.stats.compile_seconds
    return total


class TagGrammarLogits(LogitsProcessor):
    """HF: masks row i to `grammars[i]` (None: a free row). One instance per `generate` call.

    A row stops being masked once its matcher has accepted a stop token, or once it was given a token
    the grammar refuses: the EOS that `RowBudget` forces at the row's budget, or padding after a
    cancel. Until then every token of the row was chosen under the mask.
    """

    def __init__(self, grammars: Sequence[xgr.CompiledGrammar | None], vocab_size: int) -> None:
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(len(self.matchers), vocab_size)
        self.first = True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.first:
            last = input_ids[:, -1].tolist()
            for row, matcher in enumerate(self.matchers):
                # A refused token (forced EOS, padding) or an accepted stop token ends the row's constraint.
                if matcher is not None and (not matcher.accept_token(last[row]) or matcher.is_terminated()):
                    self.matchers[row] = None
        self.first = False
        rows = [row for row, matcher in enumerate(self.matchers) if matcher is not None]
        if not rows:
            return scores
        self.bitmask.fill_(-1)  # all bits set: free and finished rows keep every token
        for row in rows:
            self.matchers[row].fill_next_token_bitmask(self.bitmask, row)  # type: ignore[union-attr]
        if scores.device.type == "cuda":
            xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device, non_blocking=True))
            return scores
        masked = scores.to("cpu")
        xgr.apply_token_bitmask_inplace(masked, self.bitmask, vocab_size=self.vocab_size)
        return masked.to(scores.device)


class RowConstraint:
    """One request's matcher, fed from the request's output ids (vLLM's per-request logits processors).

    Masks the row's logits in place while the grammar is live; a refused or stop token ends it.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size
        self.fed = 0
        self.done = False

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        while self.fed < len(output_ids) and not self.done:
            token = int(output_ids[self.fed])
            self.fed += 1
            self.done = not self.matcher.accept_token(token) or self.matcher.is_terminated()
        if self.done:
            return logits
        self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        row = logits.unsqueeze(0)  # a view: masked in place
        bitmask = self.bitmask.to(logits.device, non_blocking=True) if logits.is_cuda else self.bitmask
        xgr.apply_token_bitmask_inplace(row, bitmask, vocab_size=min(self.vocab_size, logits.shape[-1]))
        return logits
