"""The hf backend's model on the tiny offline model: loaded through from_pretrained, one batched generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_engines import GRO_PROMPT, GROUNDING, OCR, SIZES, noise, scripted

from varco.workers.devtools.scripted import ScriptBook
from varco.workers.engines.base import GenerationRequest
from varco.workers.engines.hf import HFEngine
from varco.workers.engines.hf_model import HFModel


@pytest.fixture(scope="module")
def model(hf_engine: HFEngine) -> HFModel:
    return hf_engine.model


def test_tiny_model_is_a_saved_llava_onevision_with_varco_tokens(tiny_model_dir: Path, model: HFModel) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert config["vision_aspect_ratio"] == "anyres_max_9"
    assert type(model.processor).__name__ == "LlavaOnevisionProcessor"
    assert sum(p.numel() for p in model.model.parameters()) < 1_000_000
    tokenizer = model.processor.tokenizer
    for tag in ["<gro>", "<ocr>", "<char>", "</char>", "<obj>", "</obj>", "<bbox>", "</bbox>", "<delim>",
                "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<video>"]:  # fmt: skip
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
    chat = model.chat_text("hello")
    assert chat.index("<image>") < chat.index("hello")  # image before text, Qwen style


def test_tags_vanish_when_special_tokens_are_skipped(model: HFModel) -> None:
    """Why the engine decodes with skip_special_tokens=False."""
    ids = model.processor.tokenizer.encode("<obj>cat</obj><bbox>0.1, 0.2, 0.3, 0.4</bbox>", add_special_tokens=False)
    assert model.processor.tokenizer.decode(ids, skip_special_tokens=True) == "cat0.1, 0.2, 0.3, 0.4"


def test_vision_tower_is_saved_in_the_nested_layout_both_backends_read(tiny_model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(tiny_model_dir / "model.safetensors", "pt") as weights:
        tower = [k for k in weights.keys() if k.startswith("vision_tower.")]  # noqa: SIM118 - not a dict
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    text = config["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] >= 32  # vLLM's CPU attention needs head size >= 32


def test_collate_pads_like_the_processor_does_for_a_batch(model: HFModel) -> None:
    requests = [GenerationRequest(noise(w, h, i), "Describe this image.", 8) for i, (w, h) in enumerate(SIZES)]
    mine = model.collate([model.prepare(r) for r in requests])
    theirs = model.processor(
        images=[r.image for r in requests],
        text=[model.chat_text(r.prompt) for r in requests],
        return_tensors="pt",
        padding=True,
    )
    for key in ("input_ids", "attention_mask", "image_sizes"):
        assert mine[key].tolist() == theirs[key].tolist(), key
    assert mine["pixel_values"].shape == theirs["pixel_values"].shape
    for row, request in enumerate(requests):
        patches = model.prepare(request).pixel_values.shape[0]
        assert (mine["pixel_values"][row, :patches] == theirs["pixel_values"][row, :patches]).all()


def test_one_generate_call_mixes_sizes_and_budgets_and_equals_one_at_a_time(
    model: HFModel, script_book: ScriptBook
) -> None:
    requests = [
        scripted(script_book, "hf-gro", GRO_PROMPT, GROUNDING, SIZES[0], 700, seed=0),
        scripted(script_book, "hf-ocr", "<ocr>", OCR, SIZES[1], 5, seed=1),
        GenerationRequest(noise(*SIZES[2], 2), GRO_PROMPT, 40),
        scripted(script_book, "hf-ko", GRO_PROMPT, "짧은 답", SIZES[3], 700, seed=3),
    ]
    batched = model.generate([model.prepare(r) for r in requests])  # one generate call, four rows
    assert batched[0].text == GROUNDING
    assert batched[1].output_tokens == 5 and batched[1].finish_reason == "length"
    assert batched[2].output_tokens == 40 or batched[2].finish_reason == "stop"
    assert batched[3].text == "짧은 답"
    assert batched == [model.generate([model.prepare(r)])[0] for r in requests]


def test_empty_batch(model: HFModel) -> None:
    assert model.generate([]) == []
