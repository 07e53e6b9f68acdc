"""The tag constraint inside vLLM: a per-request logits processor over `tag_constraint.RowConstraint`.

Imported by vLLM's engine core (the class is named in `logits_processors`), so constrained and free
requests share one running batch; a request carries its shape and stop ids in
`SamplingParams.extra_args`. vLLM's own structured outputs (`structural_tag`) were tried first: its
xgrammar backend compiles every request's grammar with one cached `GrammarCompiler`, whose cache
conflates token formats across structural tags in xgrammar 0.2.8 (see `tag_constraint.TagGrammars`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoTokenizer
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from varco.tasks.tag_grammar import OutputShape
from varco.workers.engines.tag_constraint import RowConstraint, TagGrammars

SHAPE_ARG = "varco_tag_shape"
STOP_IDS_ARG = "varco_stop_ids"
PROCESSOR = f"{__name__}:TagConstraintLogits"


class TagConstraintLogits(AdapterLogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.tokenizer_name = vllm_config.model_config.tokenizer
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self._grammars: dict[tuple[int, ...], TagGrammars] = {}  # by stop ids: one per engine in practice
        self._lock = threading.Lock()

    def is_argmax_invariant(self) -> bool:
        return False

    def grammars(self, stop_ids: tuple[int, ...]) -> TagGrammars:
        with self._lock:
            if stop_ids not in self._grammars:
                tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
                self._grammars[stop_ids] = TagGrammars(tokenizer, self.vocab_size, stop_ids)
            return self._grammars[stop_ids]

    def new_req_logits_processor(self, params: Any) -> Callable[[list[int], torch.Tensor], torch.Tensor] | None:
        extra = params.extra_args or {}
        if (shape := extra.get(SHAPE_ARG)) is None:
            return None
        grammars = self.grammars(tuple(int(i) for i in extra[STOP_IDS_ARG]))
        return RowConstraint(grammars.get(OutputShape(shape)), grammars.vocab_size)


def request_args(shape: OutputShape, stop_ids: list[int]) -> dict[str, Any]:
    return {SHAPE_ARG: shape.value, STOP_IDS_ARG: list(stop_ids)}
