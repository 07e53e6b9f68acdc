"""The HF model behind the hf backend: loads VARCO-VISION once and runs one batched greedy `generate`.

`prepare` runs the processor on one request in a task thread (tokenising, anyres tiling, resizing,
normalising: 26-80 ms per image at the real config, which would otherwise be GPU idle time);
`generate` left-pads prepared requests of any image sizes into one `generate` call and returns for
each the raw decoded text with the VARCO tags kept (`skip_special_tokens=False`; EOS/padding
stripped) and its token counts.

Per-request `max_new_tokens` inside one batch: the batch runs to the largest budget and a logits
processor forces EOS on each row once it has used its own budget, so every request gets exactly
the output it would get alone.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoProcessor,
    GenerationConfig,
    LlavaOnevisionForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from varco.tasks.tag_patterns import END_OF_TURN
from varco.workers.engines.base import (
    EngineHooks,
    GenerationOutput,
    GenerationRequest,
    cuda_available,
    user_turn,
    weights_dtype,
)
from varco.workers.engines.decode import stop_token_ids, to_output
from varco.workers.engines.tag_constraint import TagGrammarLogits, TagGrammars

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRequest:
    """One request after the processor: what the engine thread batches without touching the image again."""

    request: GenerationRequest
    input_ids: torch.Tensor  # (length,)
    pixel_values: torch.Tensor  # (patches, 3, tile, tile), already in the model's dtype
    image_sizes: torch.Tensor  # (2,)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])


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


def attention_implementation(device: str) -> str:
    """flash-attn on CUDA when it is installed (the `gpu` extra), else PyTorch's sdpa."""
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class HFModel:
    def __init__(
        self, model: str, *, dtype: str = "auto", device: str | None = None, hooks: EngineHooks | None = None
    ) -> None:
        self.model_name = model
        self.device = device or ("cuda" if cuda_available() else "cpu")
        self.dtype: torch.dtype = getattr(torch, weights_dtype(dtype, self.device))
        self.model: LlavaOnevisionForConditionalGeneration | None = None
        self.processor = None
        self.load_seconds = 0.0
        self.hooks = hooks or EngineHooks()
        self._grammars: TagGrammars | None = None

    def load(self) -> HFModel:
        """Load weights and processor once, the same way for the real and the tiny model."""
        if self.model is not None:
            return self
        started = time.perf_counter()
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            self.model_name,
            dtype=self.dtype,
            device_map=self.device,
            attn_implementation=attention_implementation(self.device),
        ).eval()
        self.use(model, AutoProcessor.from_pretrained(self.model_name))
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s on %s (%s) in %.1fs", self.model_name, self.device, self.dtype, self.load_seconds)
        return self

    def use(self, model: LlavaOnevisionForConditionalGeneration, processor: Any) -> HFModel:
        """Adopt a model and processor (loaded, or built in memory as the GPU bench does) and derive
        what generation needs from them."""
        self.model, self.processor = model, processor
        self.processor.tokenizer.padding_side = "left"  # decoder-only batching pads on the left
        tokenizer = self.processor.tokenizer
        self.eos_token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)  # what RowBudget forces
        self.stop_ids = stop_token_ids(tokenizer, self.model.generation_config.eos_token_id)
        # Built once: without it every generate() call re-derives one from the model config, which
        # constructs a default config object (~10 ms of Python per call, on the device's thread).
        self.generation_config = GenerationConfig(
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=self.stop_ids,
        )
        self._grammars = None
        return self

    @property
    def grammars(self) -> TagGrammars:
        """The tag grammars for this model's tokenizer, built on the first constrained request."""
        if self._grammars is None:
            vocab_size = int(self.model.get_output_embeddings().weight.shape[0])  # the logits' width
            self._grammars = TagGrammars(self.processor.tokenizer, vocab_size, self.stop_ids)
        return self._grammars

    def tag_constraint(self, requests: Sequence[GenerationRequest]) -> TagGrammarLogits | None:
        """One xgrammar matcher per constrained row; None when the batch has none."""
        if all(r.constraint is None for r in requests):
            return None
        grammars = self.grammars
        compiled = [grammars.get(r.constraint) if r.constraint is not None else None for r in requests]
        return TagGrammarLogits(compiled, grammars.vocab_size)

    def chat_text(self, prompt: str) -> str:
        return self.processor.apply_chat_template(user_turn(prompt), add_generation_prompt=True)

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenise and preprocess one request (any thread: the processor holds no device state)."""
        if self.model is None:
            self.load()
        one_cpu_thread_for_torch()
        inputs = self.processor(images=[request.image], text=[self.chat_text(request.prompt)], return_tensors="pt")
        return PreparedRequest(
            request=request,
            input_ids=inputs["input_ids"][0],
            pixel_values=inputs["pixel_values"][0].to(self.dtype),
            image_sizes=inputs["image_sizes"][0],
        )

    def collate(self, prepared: Sequence[PreparedRequest]) -> dict[str, torch.Tensor]:
        """Left-pad token ids, zero-pad image patches: what the processor does for a batch."""
        length = max(p.prompt_tokens for p in prepared)
        patches = max(p.pixel_values.shape[0] for p in prepared)
        pad_id = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(prepared), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prepared), length), dtype=torch.long)
        pixel_values = torch.zeros((len(prepared), patches, *prepared[0].pixel_values.shape[1:]), dtype=self.dtype)
        for row, p in enumerate(prepared):
            input_ids[row, length - p.prompt_tokens :] = p.input_ids
            attention_mask[row, length - p.prompt_tokens :] = 1
            pixel_values[row, : p.pixel_values.shape[0]] = p.pixel_values
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_sizes": torch.stack([p.image_sizes for p in prepared]),
            "batch_num_images": torch.ones(len(prepared), dtype=torch.long),
        }

    @torch.inference_mode()
    def generate(
        self,
        prepared: Sequence[PreparedRequest],
        *,
        stopping_criteria: StoppingCriteriaList | None = None,
    ) -> list[GenerationOutput]:
        if not prepared:
            return []
        if self.model is None:
            self.load()
        inputs = {k: v.to(self.model.device) for k, v in self.collate(prepared).items()}
        prompt_length = inputs["input_ids"].shape[1]
        requests = [p.request for p in prepared]
        budgets = [r.max_new_tokens for r in requests]
        processors = LogitsProcessorList()
        for factory in self.hooks.hf_logits_processors:
            processor = factory(requests, self.processor.tokenizer)
            if processor is not None:
                processors.append(processor)
        if (constraint := self.tag_constraint(requests)) is not None:
            processors.append(constraint)  # after the plugins (scripted answers), before the budget's EOS
        processors.append(RowBudget(budgets, prompt_length, self.eos_token_id))
        config = copy.copy(self.generation_config)
        config.max_new_tokens = max(budgets)
        output = self.model.generate(
            **inputs,
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=stopping_criteria,
        )
        tokenizer = self.processor.tokenizer
        return [
            to_output(
                row[prompt_length:].tolist(),
                tokenizer=tokenizer,
                stop_ids=self.stop_ids,
                prompt_tokens=p.prompt_tokens,
                budget=budget,
            )
            for row, budget, p in zip(output, budgets, prepared, strict=True)
        ]


_thread_state = threading.local()


def one_cpu_thread_for_torch() -> None:
    """Run this thread's CPU tensor ops (preprocessing) on one OpenMP thread.

    torch's intra-op thread count is per calling thread, and each thread that runs a parallel op gets
    a team of OpenMP threads as wide as the machine; a worker's 16+ task threads then oversubscribe
    the cores the engine thread's ops need. Preprocessing runs in many task threads at once already.
    """
    if not getattr(_thread_state, "single", False):
        torch.set_num_threads(1)
        _thread_state.single = True
