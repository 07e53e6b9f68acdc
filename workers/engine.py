"""The inference engine: loads VARCO-VISION once and runs batched greedy generation.

One engine per process owns the device. `generate` takes a batch of (image, prompt, budget)
requests of any image sizes, left-pads them into one `generate` call, and returns for each the
raw decoded text with the VARCO tags kept (`skip_special_tokens=False`; EOS/padding stripped)
and its token counts.

Per-request `max_new_tokens` inside one batch: the batch runs to the largest budget and a logits
processor forces EOS on each row once it has used its own budget, so every request gets exactly
the output it would get alone, and a short request never pays for a long one's tokens beyond the
batch's wall time.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaOnevisionForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from varco.workers.scripted import ScriptedLogits

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationRequest:
    image: Image.Image
    prompt: str  # the user text; the chat template adds the image
    max_new_tokens: int = 1024
    # Forced output for the random-weight tiny model (tests, demo); never set for a real model.
    script: str | None = None


@dataclass(frozen=True)
class GenerationOutput:
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: FinishReason


class RowBudget(LogitsProcessor):
    """Forces EOS on each row once it has generated its own `max_new_tokens`.

    Runs every decode step, so it avoids anything that makes the GPU wait: no `nonzero()`, and
    nothing at all before the smallest budget is reached.
    """

    def __init__(self, budgets: Sequence[int], prompt_length: int, eos_token_id: int) -> None:
        self.budgets = torch.tensor(list(budgets))
        self.smallest = min(budgets)
        self.prompt_length = prompt_length
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        if step < self.smallest:
            return scores
        if self.budgets.device != scores.device:
            self.budgets = self.budgets.to(scores.device)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos_token_id] = 0.0
        return torch.where((self.budgets <= step)[:, None], forced, scores)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def attention_implementation(device: str) -> str:
    """flash-attn on CUDA when it is installed (the `gpu` extra), else PyTorch's sdpa."""
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class Engine:
    def __init__(self, model: str, *, dtype: str = "auto", device: str | None = None) -> None:
        self.model_name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        self.model: LlavaOnevisionForConditionalGeneration | None = None
        self.processor = None
        self.load_seconds = 0.0

    def load(self) -> Engine:
        """Load weights and processor once, the same way for the real and the tiny model."""
        if self.model is not None:
            return self
        started = time.perf_counter()
        self.processor = AutoProcessor.from_pretrained(self.model_name)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batching pads on the left
        self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            self.model_name,
            dtype=self.dtype,
            device_map=self.device,
            attn_implementation=attention_implementation(self.device),
        ).eval()
        tokenizer = self.processor.tokenizer
        self.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = {self.eos_token_id, tokenizer.pad_token_id}
        self.stop_ids |= set(_as_list(self.model.generation_config.eos_token_id))
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s on %s (%s) in %.1fs", self.model_name, self.device, self.dtype, self.load_seconds)
        return self

    def chat_text(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        logits_processors: Sequence[LogitsProcessor] = (),
        stopping_criteria: StoppingCriteriaList | None = None,
    ) -> list[GenerationOutput]:
        if not requests:
            return []
        if self.model is None:
            self.load()
        inputs = self.processor(
            images=[r.image for r in requests],
            text=[self.chat_text(r.prompt) for r in requests],
            return_tensors="pt",
            padding=True,
        ).to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        prompt_length = inputs["input_ids"].shape[1]
        budgets = [r.max_new_tokens for r in requests]
        processors = LogitsProcessorList(logits_processors)
        if any(r.script is not None for r in requests):
            processors.append(ScriptedLogits.from_texts([r.script for r in requests], self.processor.tokenizer))
        processors.append(RowBudget(budgets, prompt_length, self.eos_token_id))
        output = self.model.generate(
            **inputs,
            max_new_tokens=max(budgets),
            do_sample=False,
            logits_processor=processors,
            stopping_criteria=stopping_criteria,
            pad_token_id=self.processor.tokenizer.pad_token_id,
            eos_token_id=sorted(self.stop_ids),
        )
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [
            self._decode(row[prompt_length:].tolist(), budget, int(used))
            for row, budget, used in zip(output, budgets, prompt_tokens, strict=True)
        ]

    def _decode(self, ids: list[int], budget: int, prompt_tokens: int) -> GenerationOutput:
        end = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        text = self.processor.tokenizer.decode(ids[:end], skip_special_tokens=False)
        return GenerationOutput(
            text=text.strip(),
            prompt_tokens=prompt_tokens,
            output_tokens=end,
            finish_reason="length" if end >= budget else "stop",
        )


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
