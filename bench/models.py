"""Random-weight LLaVA-OneVision checkpoints for the benchmarks, saved the way `make_tiny_model` saves its own.

`tiny` is the project's tiny model (~150k parameters: measures the engines' own overhead); `medium`
(~50M parameters) is big enough that compute dominates on a CPU, so the backends' scheduling shows.
Both use the tiny model's byte-level tokenizer and chat template and load in both backends.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from varco.workers.devtools.tiny_model import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    build_tokenizer,
    make_tiny_model,
    nest_vision_tower,
)

MODEL_NAMES = ("tiny", "medium")
# Long enough for the head-of-line job on a GPU (8192 new tokens plus the prompt) in both backends.
MAX_POSITIONS = 32768


def pinpoints(tile: int) -> list[list[int]]:
    """anyres_max_9's 1..6 tiles per side, as the real model, at this tile size."""
    return [[tile * h, tile * w] for h in range(1, 7) for w in range(1, 7)]


def build_processor(tokenizer: PreTrainedTokenizerFast, tile: int, patch: int) -> LlavaOnevisionProcessor:
    size = {"height": tile, "width": tile}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints(tile)),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(tile // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    text: dict[str, Any],
    vision: dict[str, Any],
    tile: int,
    patch: int,
    tie_word_embeddings: bool = True,
) -> LlavaOnevisionConfig:
    """The same LlavaOnevision config as the tiny model's, with the given text and vision dimensions."""
    text_config = Qwen2Config(
        vocab_size=text.pop("vocab_size", len(tokenizer)),  # == len(tokenizer) unless the caller wants the real one
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=tie_word_embeddings,
        **text,
    )
    vision_config = SiglipVisionConfig(image_size=tile, patch_size=patch, vision_use_head=False, **vision)
    return LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints(tile),
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=tie_word_embeddings,
    )


def medium_config(tokenizer: PreTrainedTokenizerFast) -> tuple[LlavaOnevisionConfig, int, int]:
    """~50M parameters: a Qwen2 of 8 layers x 512 (head size 64, as vLLM's CPU attention wants) and an 8-layer
    SigLIP on 64-pixel tiles of 8-pixel patches (64 image tokens per tile, prompts of a few hundred tokens)."""
    tile, patch = 64, 8
    text = {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "initializer_range": 0.02,
    }
    vision = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8}
    return build_config(tokenizer, text, vision, tile, patch), tile, patch


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)]
    return GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, do_sample=False)


def save_config_only(
    directory: Path, config: LlavaOnevisionConfig, tokenizer: PreTrainedTokenizerFast, tile: int, patch: int
) -> Path:
    """Config, generation config, tokenizer and processor, no weights: what vLLM's `load_format="dummy"` needs."""
    directory.mkdir(parents=True, exist_ok=True)
    # A model's save_pretrained records its class; a bare config does not, and vLLM picks its model by it.
    config.architectures = [LlavaOnevisionForConditionalGeneration.__name__]
    config.save_pretrained(directory)
    generation_config(tokenizer).save_pretrained(directory)
    build_processor(tokenizer, tile, patch).save_pretrained(directory)
    return directory


def make_model(name: str, directory: Path, seed: int = 0) -> Path:
    """Build and save the named benchmark model under `directory`; returns the model directory."""
    out = directory / f"{name}-varco"
    if name == "tiny":
        make_tiny_model(out, seed)
        # The tiny model says 8192 positions; the head-of-line job on a GPU needs more. Rotary embeddings have no
        # fixed table, so only the declared limit (which vLLM checks max_model_len against) changes.
        path = out / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["text_config"]["max_position_embeddings"] = MAX_POSITIONS
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return out
    if name != "medium":
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config, tile, patch = medium_config(tokenizer)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out)
    build_processor(tokenizer, tile, patch).save_pretrained(out)
    nest_vision_tower(out / "model.safetensors")  # vLLM reads only the nested vision-tower layout
    return out


def parameter_count(model_dir: Path) -> int:
    """Parameters in the saved weights, read from the safetensors header (tied embeddings count once)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118 (not a dict)
