"""A logits processor that makes `generate()` emit an exact, scripted token sequence per row.

With random weights the tiny model says nothing meaningful; forcing its logits lets tests (and
the demo) drive the real generate -> decode -> parse path with known VARCO-style output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase


class ScriptedLogits(LogitsProcessor):
    """Row i emits `scripts[i]` then EOS; a row whose script is None is left to the model."""

    def __init__(self, scripts: Sequence[Sequence[int] | None], eos_token_id: int) -> None:
        self.scripts = [list(s) if s is not None else None for s in scripts]
        self.eos_token_id = eos_token_id
        self.prompt_length: int | None = None  # learnt on the first step, which sees just the prompt

    @classmethod
    def from_texts(cls, texts: Sequence[str | None], tokenizer: PreTrainedTokenizerBase) -> ScriptedLogits:
        scripts = [tokenizer.encode(t, add_special_tokens=False) if t is not None else None for t in texts]
        return cls(scripts, tokenizer.convert_tokens_to_ids("<|im_end|>"))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        step = input_ids.shape[1] - self.prompt_length
        for row, script in enumerate(self.scripts):
            if script is None:
                continue
            token = script[step] if step < len(script) else self.eos_token_id
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores
