"""The engine on the tiny offline model: loaded through from_pretrained, generate -> decode -> parse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import card_output

pytest.importorskip("torch")

from PIL import Image

from varco.tasks.tags import parse
from varco.workers.engine import Engine, GenerationRequest

GROUNDING = card_output("grounding")
OCR = card_output("ocr")
GRO_PROMPT = "<gro>\nDescribe the image in detail."


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


SIZES = [(640, 480), (120, 360), (1500, 200), (37, 51)]


def test_tiny_model_is_a_saved_llava_onevision_with_varco_tokens(tiny_model_dir: Path, engine: Engine) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert config["vision_aspect_ratio"] == "anyres_max_9"
    assert type(engine.processor).__name__ == "LlavaOnevisionProcessor"
    assert sum(p.numel() for p in engine.model.parameters()) < 1_000_000
    tokenizer = engine.processor.tokenizer
    for tag in ["<gro>", "<ocr>", "<char>", "</char>", "<obj>", "</obj>", "<bbox>", "</bbox>", "<delim>",
                "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<video>"]:  # fmt: skip
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
    chat = engine.chat_text("hello")
    assert chat.index("<image>") < chat.index("hello")  # image before text, Qwen style


def test_tags_vanish_when_special_tokens_are_skipped(engine: Engine) -> None:
    """Why the engine decodes with skip_special_tokens=False."""
    ids = engine.processor.tokenizer.encode("<obj>cat</obj><bbox>0.1, 0.2, 0.3, 0.4</bbox>", add_special_tokens=False)
    assert engine.processor.tokenizer.decode(ids, skip_special_tokens=True) == "cat0.1, 0.2, 0.3, 0.4"


def test_scripted_grounding_through_generate_decode_parse(engine: Engine) -> None:
    [out] = engine.generate([GenerationRequest(noise(640, 480, 0), GRO_PROMPT, 1024, script=GROUNDING)])
    assert out.text == GROUNDING
    assert out.finish_reason == "stop"
    assert out.output_tokens == len(engine.processor.tokenizer.encode(GROUNDING, add_special_tokens=False))
    assert out.prompt_tokens > 100  # the image's tokens are counted
    parsed = parse(out.text, (640, 480))
    assert [o.label for o in parsed.objects] == ["two cats", "a pink blanket", "two remote controls"]
    assert parsed.objects[0].boxes_px == [(9, 51, 326, 478), (326, 26, 637, 378)]


def test_batched_mixed_sizes_scripted(engine: Engine) -> None:
    scripts = [GROUNDING, OCR, None, "짧은 답"]
    requests = [
        GenerationRequest(noise(w, h, i), GRO_PROMPT if i != 1 else "<ocr>", 700, script=s)
        for i, ((w, h), s) in enumerate(zip(SIZES, scripts, strict=True))
    ]
    batched = engine.generate(requests)
    assert batched[0].text == GROUNDING
    assert batched[1].text == OCR
    assert len(parse(batched[1].text).ocr) == 16
    assert batched[3].text == "짧은 답"
    singles = [engine.generate([r])[0] for r in requests]
    assert batched == singles


def test_batched_equals_one_at_a_time_unscripted_greedy(engine: Engine) -> None:
    prompts = ["Describe this image.", "<ocr>", GRO_PROMPT, "무엇이 보이나요?"]
    requests = [
        GenerationRequest(noise(w, h, 10 + i), p, 24) for i, ((w, h), p) in enumerate(zip(SIZES, prompts, strict=True))
    ]
    batched = engine.generate(requests)
    assert len({o.text for o in batched}) > 1  # the random model does say different things
    assert batched == [engine.generate([r])[0] for r in requests]
    assert [o.prompt_tokens for o in batched] == [engine.generate([r])[0].prompt_tokens for r in requests]


def test_truncated_output_through_the_whole_path(engine: Engine) -> None:
    """max_new_tokens cuts the card's grounding answer inside a box; parse repairs, never raises."""
    cut = GROUNDING[: GROUNDING.index("0.996, 0.787") + len("0.9")]  # "...<delim>0.51, 0.054, 0.9"
    budget = len(engine.processor.tokenizer.encode(cut, add_special_tokens=False))
    [out] = engine.generate([GenerationRequest(noise(640, 480, 1), GRO_PROMPT, budget, script=GROUNDING)])
    assert out.finish_reason == "length" and out.output_tokens == budget
    assert out.text == cut
    parsed = parse(out.text, (640, 480))
    assert parsed.warnings
    assert parsed.objects[0].label == "two cats"
    assert parsed.objects[0].boxes == [(0.014, 0.106, 0.51, 0.996)]


def test_each_request_keeps_its_own_budget_in_a_batch(engine: Engine) -> None:
    requests = [
        GenerationRequest(noise(64, 64, 2), "a", 5, script=GROUNDING),
        GenerationRequest(noise(300, 100, 3), "b", 60, script=GROUNDING),
        GenerationRequest(noise(100, 300, 4), "c", 40, script="short"),
    ]
    out = engine.generate(requests)
    assert [o.output_tokens for o in out] == [5, 60, 5]
    assert [o.finish_reason for o in out] == ["length", "length", "stop"]
    assert out[0].text == GROUNDING[:5] and out[2].text == "short"


def test_empty_batch(engine: Engine) -> None:
    assert engine.generate([]) == []
