"""Both engine backends, through the one interface, on the tiny model loaded from disk.

Scripted answers (forced by the dev tooling's logits processors) drive generate -> decode -> parse
on the model card's exact outputs; unscripted greedy output checks that requests sharing the engine
get what they would get alone.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import card_output
from PIL import Image

from varco.tasks.tags import parse
from varco.workers.devtools.scripted import ScriptBook
from varco.workers.engines.base import Cancelled, EngineBackend, GenerationRequest

GROUNDING = card_output("grounding")
OCR = card_output("ocr")
GRO_PROMPT = "<gro>\nDescribe the image in detail."
SIZES = [(640, 480), (120, 360), (1500, 200), (37, 51)]


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def scripted(book: ScriptBook, image_id: str, prompt: str, answer: str, size=(640, 480), budget=1024, seed=0):
    book.scripts[f"{image_id}:{prompt}"] = answer
    return GenerationRequest(noise(*size, seed), prompt, budget, image_id=image_id)


def token_count(engine: EngineBackend, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(engine.model_name).encode(text, add_special_tokens=False))


def test_scripted_grounding_through_generate_decode_parse(engine: EngineBackend, script_book: ScriptBook) -> None:
    out = engine.generate(scripted(script_book, "gro-0", GRO_PROMPT, GROUNDING))
    assert out.text == GROUNDING
    assert out.finish_reason == "stop"
    assert out.output_tokens == token_count(engine, GROUNDING)
    assert out.prompt_tokens > 100  # the image's tokens are counted
    parsed = parse(out.text, (640, 480))
    assert [o.label for o in parsed.objects] == ["two cats", "a pink blanket", "two remote controls"]
    assert parsed.objects[0].boxes_px == [(9, 51, 326, 478), (326, 26, 637, 378)]


def test_concurrent_mixed_requests_each_get_their_own_scripted_output(
    engine: EngineBackend, script_book: ScriptBook
) -> None:
    answers = [GROUNDING, OCR, "짧은 답", *(f"answer number {i}" for i in range(5))]
    requests = [
        scripted(script_book, f"mix-{i}", "<ocr>" if i == 1 else GRO_PROMPT, text, SIZES[i % 4], 700, seed=i)
        for i, text in enumerate(answers)
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        outputs = list(pool.map(engine.generate, requests))
    assert [o.text for o in outputs] == answers
    assert len(parse(outputs[1].text).ocr) == 16


def test_each_request_keeps_its_own_budget_exactly(engine: EngineBackend, script_book: ScriptBook) -> None:
    requests = [
        scripted(script_book, "budget-a", "a", GROUNDING, (64, 64), 5),
        scripted(script_book, "budget-b", "b", GROUNDING, (300, 100), 60),
        scripted(script_book, "budget-c", "c", "short", (100, 300), 40),
        GenerationRequest(noise(80, 80, 7), "unscripted", 13),
    ]
    futures = [engine.submit(engine.prepare(r)) for r in requests]
    out = [f.result(timeout=120) for f in futures]
    assert [o.output_tokens for o in out][:3] == [5, 60, token_count(engine, "short")]
    assert [o.finish_reason for o in out][:3] == ["length", "length", "stop"]
    assert out[0].text == GROUNDING[:5] and out[2].text == "short"
    assert out[3].output_tokens <= 13


def test_truncated_output_through_the_whole_path(engine: EngineBackend, script_book: ScriptBook) -> None:
    """max_new_tokens cuts the card's grounding answer inside a box; parse repairs, never raises."""
    cut = GROUNDING[: GROUNDING.index("0.996, 0.787") + len("0.9")]  # "...<delim>0.51, 0.054, 0.9"
    request = scripted(script_book, "cut", GRO_PROMPT, GROUNDING, budget=token_count(engine, cut))
    out = engine.generate(request)
    assert out.finish_reason == "length" and out.output_tokens == request.max_new_tokens
    assert out.text == cut
    parsed = parse(out.text, (640, 480))
    assert parsed.warnings
    assert parsed.objects[0].boxes == [(0.014, 0.106, 0.51, 0.996)]


def test_unscripted_greedy_output_is_the_same_alone_and_together(engine: EngineBackend) -> None:
    prompts = ["Describe this image.", "<ocr>", GRO_PROMPT, "무엇이 보이나요?"]
    requests = [
        GenerationRequest(noise(w, h, 10 + i), p, 24) for i, ((w, h), p) in enumerate(zip(SIZES, prompts, strict=True))
    ]
    together = [f.result(timeout=120) for f in [engine.submit(engine.prepare(r)) for r in requests]]
    alone = [engine.generate(r) for r in requests]
    assert len({o.text for o in together}) > 1  # the random model does say different things
    assert together == alone


def test_the_backends_agree_token_for_token(hf_engine: EngineBackend, vllm_engine: EngineBackend) -> None:
    """Same checkpoint, same prompt, same dtype, same greedy decoding: vLLM is a drop-in for the reference."""
    sizes = [(640, 480), (800, 600), (64, 48), (37, 51), (1500, 200), (300, 1000)]
    requests = [GenerationRequest(noise(w, h, 30 + i), "<ocr>", 16) for i, (w, h) in enumerate(sizes)]
    hf = [hf_engine.generate(r) for r in requests]
    vllm = [vllm_engine.generate(r) for r in requests]
    assert [o.prompt_tokens for o in vllm] == [o.prompt_tokens for o in hf]
    assert vllm == hf


def test_cancel_stops_a_running_generation_and_spares_its_neighbour(
    engine: EngineBackend, script_book: ScriptBook
) -> None:
    from varco.workers.devtools import scripted as dev

    with pytest.raises(Cancelled):  # cancelled before it starts: never generated
        engine.generate(scripted(script_book, "pre", "x", "never"), is_cancelled=lambda: True)
    long_id = f"long-{engine.name}"
    long = scripted(script_book, long_id, "y", "y" * 3000, (64, 64), 3000)
    short = scripted(script_book, f"short-{engine.name}", "z", GROUNDING, (80, 80), 1024)
    cancel = threading.Event()

    def cancel_once_running(image_id: str, step: int) -> None:
        # Runs in the engine's thread as the 10th token is forced: the request is generating, for sure.
        if image_id == long_id and step == 9:
            cancel.set()

    dev.TOKEN_LISTENERS.append(cancel_once_running)
    try:
        before = dev.forced_tokens(long_id)
        long_future = engine.submit(engine.prepare(long), is_cancelled=cancel.is_set)
        short_future = engine.submit(engine.prepare(short))
        with pytest.raises(Cancelled):
            long_future.result(timeout=300)
    finally:
        dev.TOKEN_LISTENERS.remove(cancel_once_running)
    assert cancel.is_set()  # the cancel landed while it was running
    assert short_future.result(timeout=300).text == GROUNDING  # its neighbour is unaffected
    # It stopped within a step or two of the cancel, not at the end of its 3,000 tokens.
    assert 10 <= dev.forced_tokens(long_id) - before <= 12


def test_a_streamed_request_publishes_its_text_as_it_generates_and_others_publish_nothing(
    engine: EngineBackend, script_book: ScriptBook
) -> None:
    deltas: list[tuple[str, int]] = []  # each piece of text with the tokens forced so far
    from varco.workers.devtools import scripted as dev

    streamed = scripted(script_book, f"stream-{engine.name}", GRO_PROMPT, GROUNDING, (80, 80))
    plain = scripted(script_book, f"plain-{engine.name}", GRO_PROMPT, OCR, (90, 90), seed=3)
    image_id = streamed.image_id or ""
    on_delta = lambda text: deltas.append((text, dev.forced_tokens(image_id)))  # noqa: E731
    futures = [engine.submit(engine.prepare(streamed), on_delta=on_delta), engine.submit(engine.prepare(plain))]
    out, other = (f.result(timeout=300) for f in futures)
    assert out.text == GROUNDING and other.text == OCR
    assert "".join(text for text, _ in deltas) == GROUNDING  # tags kept, nothing lost or repeated
    forced = [count for _, count in deltas]
    assert len(deltas) > 10 and forced[0] < out.output_tokens // 2  # published while generating, not at the end
    assert forced == sorted(forced)
