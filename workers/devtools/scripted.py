"""Scripted answers for the random-weight tiny model: logits processors that force known token sequences.

With random weights the tiny model says nothing meaningful; forcing its logits lets tests and the
demo drive the real generate -> decode -> parse path, in both engine backends, on known VARCO-style
output. It enters as an engine plugin (`VARCO_ENGINE_PLUGINS=varco.workers.devtools.scripted:install`)
that reads `varco_scripts.json` from the model directory; no production type names it.

Scripts are keyed `"{image sha256}:{prompt}"` or `"{image sha256}:{task}"`, the image hash being
the engine request's `image_id` (the fetcher's hash of the image bytes).

Every forced token is counted per image (`varco_scripted_tokens_total{image_id}` on a node's
/metrics) and announced to `TOKEN_LISTENERS`, so tests can see how far a generation got: that a
cancel landed while it was running, and that it stopped there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter
from transformers import AutoTokenizer, LogitsProcessor, PreTrainedTokenizerBase

from varco.tasks.prompts import DEFAULT_CAPTION_PROMPT, TaskType
from varco.tasks.tag_patterns import END_OF_TURN
from varco.workers.engines.base import EngineBackend, GenerationRequest

SCRIPTS_FILE = "varco_scripts.json"
SCRIPTED_PLUGIN = "varco.workers.devtools.scripted:install"  # the value for VARCO_ENGINE_PLUGINS
EOS_TOKEN = END_OF_TURN
# SamplingParams.extra_args key carrying a request's forced token ids to the vLLM processor.
FORCED_TOKENS_ARG = "varco_forced_tokens"
FORCED_EOS_ARG = "varco_forced_eos"
FORCED_IMAGE_ARG = "varco_forced_image"

FORCED_TOKENS = Counter("varco_scripted_tokens", "Tokens forced by the scripted-answers dev plugin", ["image_id"])
# Called as listener(image_id, step) in the engine's thread for each forced token, step 0 first (dev tooling only).
TOKEN_LISTENERS: list[Callable[[str, int], None]] = []


def forced_tokens(image_id: str) -> int:
    """Tokens forced so far in this process for requests on this image."""
    return int(FORCED_TOKENS.labels(image_id=image_id)._value.get())


def _forced(image_id: str | None, step: int) -> None:
    if image_id is None:
        return
    FORCED_TOKENS.labels(image_id=image_id).inc()
    for listener in list(TOKEN_LISTENERS):
        listener(image_id, step)


def task_of(prompt: str) -> TaskType:
    """The task a model prompt was built for (tasks.prompts.build_prompt in reverse)."""
    if prompt.startswith("<gro>"):
        return TaskType.GROUNDING
    if prompt == "<ocr>":
        return TaskType.OCR
    if prompt.startswith("<obj>"):
        return TaskType.REFERRING
    return TaskType.CAPTION if prompt == DEFAULT_CAPTION_PROMPT else TaskType.VQA


class ScriptBook:
    def __init__(self, scripts: Mapping[str, str]) -> None:
        self.scripts = dict(scripts)

    @classmethod
    def from_model_dir(cls, model: str | Path) -> ScriptBook:
        path = Path(model) / SCRIPTS_FILE
        return cls(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {})

    def __bool__(self) -> bool:
        return bool(self.scripts)

    def lookup(self, request: GenerationRequest) -> str | None:
        if request.image_id is None:
            return None
        by_prompt = self.scripts.get(f"{request.image_id}:{request.prompt}")
        return by_prompt if by_prompt is not None else self.scripts.get(f"{request.image_id}:{task_of(request.prompt)}")


class ScriptedLogits(LogitsProcessor):
    """HF: row i emits `scripts[i]` then EOS; a row whose script is None is left to the model."""

    def __init__(
        self,
        scripts: Sequence[Sequence[int] | None],
        eos_token_id: int,
        image_ids: Sequence[str | None] | None = None,
    ) -> None:
        self.scripts = [list(s) if s is not None else None for s in scripts]
        self.eos_token_id = eos_token_id
        self.image_ids = list(image_ids) if image_ids is not None else [None] * len(self.scripts)
        self.prompt_length: int | None = None  # learnt on the first step, which sees just the prompt

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str | None],
        tokenizer: PreTrainedTokenizerBase,
        image_ids: Sequence[str | None] | None = None,
    ) -> ScriptedLogits:
        scripts = [tokenizer.encode(t, add_special_tokens=False) if t is not None else None for t in texts]
        return cls(scripts, tokenizer.convert_tokens_to_ids(EOS_TOKEN), image_ids)

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
            # A row that stopped (cancelled) gets padding instead of its forced token: no longer counted.
            if step < len(script) and (step == 0 or int(input_ids[row, -1]) == script[step - 1]):
                _forced(self.image_ids[row], step)
        return scores


def _vllm_processor_class() -> type:
    """vLLM's per-request adapter, built lazily: only the vllm backend imports vLLM."""
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class ScriptedVLLMLogits(AdapterLogitsProcessor):
        def is_argmax_invariant(self) -> bool:
            return False

        def new_req_logits_processor(self, params: Any) -> Any:
            extra = params.extra_args or {}
            script = extra.get(FORCED_TOKENS_ARG)
            if script is None:
                return None
            eos = int(extra[FORCED_EOS_ARG])
            image_id = extra.get(FORCED_IMAGE_ARG)

            def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
                step = len(output_ids)
                token = script[step] if step < len(script) else eos
                if step < len(script):
                    _forced(image_id, step)
                forced = torch.full_like(logits, float("-inf"))
                forced[token] = 0.0
                return forced

            return force

    return ScriptedVLLMLogits


def __getattr__(name: str) -> Any:
    # "varco.workers.devtools.scripted:ScriptedVLLMLogits" is what vLLM imports in its engine processes.
    if name == "ScriptedVLLMLogits":
        return _vllm_processor_class()
    raise AttributeError(name)


def install(engine: EngineBackend, book: ScriptBook | None = None) -> None:
    """Engine plugin: force the answers of `book` (default: the model directory's scripts file, if any).

    A book passed in is installed even while empty: tests add scripts to it as they go.
    """
    if book is None:
        book = ScriptBook.from_model_dir(engine.model_name)
        if not book:
            return

    def hf_processor(requests: list[GenerationRequest], tokenizer: Any) -> LogitsProcessor | None:
        texts = [book.lookup(r) for r in requests]
        if all(t is None for t in texts):
            return None
        return ScriptedLogits.from_texts(texts, tokenizer, [r.image_id for r in requests])

    tokenizer = AutoTokenizer.from_pretrained(engine.model_name)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    def vllm_args(request: GenerationRequest) -> dict[str, Any] | None:
        text = book.lookup(request)
        if text is None:
            return None
        return {
            FORCED_TOKENS_ARG: tokenizer.encode(text, add_special_tokens=False),
            FORCED_EOS_ARG: eos,
            FORCED_IMAGE_ARG: request.image_id,
        }

    engine.hooks.hf_logits_processors.append(hf_processor)
    engine.hooks.vllm_logits_processors.append(f"{__name__}:ScriptedVLLMLogits")
    engine.hooks.vllm_request_args.append(vllm_args)
