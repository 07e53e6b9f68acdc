"""Build a tiny VARCO-shaped LLaVA-OneVision model offline, for tests and the demo.

The real 14B weights cannot be downloaded here, so this builds the same architecture
(`LlavaOnevisionForConditionalGeneration`: Qwen2 text model, SigLIP vision tower, anyres_max_9
tiling over a 6x6 grid of tile pinpoints) with random weights and a few hundred thousand
parameters, a byte-level tokenizer carrying the VARCO special tokens, a Qwen-style chat template
and the real `LlavaOnevisionProcessor`, and saves it with `save_pretrained`. Everything that
loads it goes through the same `from_pretrained` path as the real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
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

from varco.tasks.tag_patterns import CONTROL_TOKENS, END_OF_TEXT, END_OF_TURN, VARCO_TAGS

EOS_TOKEN = END_OF_TURN
PAD_TOKEN = END_OF_TEXT
TILE = 32  # the real model's tile is 384
PATCH = 8  # the real model's patch is 14
# Same shape as the real anyres_max_9 pinpoints (1..6 tiles per side), scaled to the tiny tile.
PINPOINTS = [[TILE * h, TILE * w] for h in range(1, 7) for w in range(1, 7)]

# Qwen-style: the image comes before the user's text, as in VARCO's own template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte is a token, the special tokens are single ids."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[*CONTROL_TOKENS, *VARCO_TAGS],
        padding_side="left",
        model_max_length=32768,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaOnevisionProcessor:
    size = {"height": TILE, "width": TILE}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=PINPOINTS),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        # Head size 32: vLLM's CPU attention takes 32, 64, 80, … but not 16.
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        # Wider than the usual 0.02 so greedy decoding wanders instead of repeating one token.
        initializer_range=0.5,
    )
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)]
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=256
    )
    return model


def make_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny model; returns the directory `from_pretrained` loads it from."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    nest_vision_tower(out / "model.safetensors")
    return out


def nest_vision_tower(weights: Path) -> None:
    """Save the vision tower as `vision_tower.vision_model.*`, the layout of the released checkpoints.

    transformers 5 writes a fresh model's tower as `vision_tower.*` and reads both layouts; vLLM reads
    only the nested one. Rewritten once after the first save, the file loads in both backends.
    """
    tensors = load_file(weights)
    prefix, nested = "vision_tower.", "vision_tower.vision_model."
    renamed = {
        (nested + key[len(prefix) :] if key.startswith(prefix) and not key.startswith(nested) else key): value
        for key, value in tensors.items()
    }
    save_file(renamed, weights, metadata={"format": "pt"})
