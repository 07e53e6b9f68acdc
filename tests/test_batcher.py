"""The batcher on the tiny model: concurrent submitters share batches, cancels and failures stay local."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("torch")

from helpers import card_output
from PIL import Image

from varco.workers.batcher import Batcher, Cancelled
from varco.workers.engine import Engine, GenerationRequest


def request(size: tuple[int, int], script: str | None = None, tokens: int = 32) -> GenerationRequest:
    return GenerationRequest(Image.new("RGB", size, (9, 99, 199)), "Describe this image.", tokens, script=script)


def test_concurrent_submitters_are_batched_and_each_gets_its_own_output(engine: Engine) -> None:
    batcher = Batcher(engine, max_batch_size=8, max_wait_ms=200).start()
    try:
        scripts = [f"answer number {i}" for i in range(8)]
        sizes = [(640, 480), (100, 300), (300, 100), (50, 50)] * 2
        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(lambda i: batcher.generate(request(sizes[i], scripts[i])), range(8)))
        assert [o.text for o in outputs] == scripts
        assert batcher.batches_run < 8  # they shared batches
    finally:
        batcher.stop()


def test_a_cancelled_request_is_dropped_or_stopped(engine: Engine) -> None:
    batcher = Batcher(engine, max_batch_size=4, max_wait_ms=50).start()
    try:
        with pytest.raises(Cancelled):
            batcher.generate(request((64, 64), "x"), is_cancelled=lambda: True)
        flag = threading.Event()
        long = batcher.submit(request((64, 64), "y" * 3000, tokens=3000), is_cancelled=flag.is_set)
        short = batcher.submit(request((80, 80), card_output("grounding"), tokens=1024))
        flag.set()
        with pytest.raises(Cancelled):
            long.result(timeout=120)
        assert short.result(timeout=120).text == card_output("grounding")  # its batch mate is unaffected
    finally:
        batcher.stop()


def test_one_failing_request_does_not_fail_its_batch_mates(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine.generate

    def flaky(requests, **kwargs):
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(requests, **kwargs)

    monkeypatch.setattr(engine, "generate", flaky)
    batcher = Batcher(engine, max_batch_size=4, max_wait_ms=300).start()
    try:
        bad = GenerationRequest(Image.new("RGB", (32, 32)), "boom", 4)
        futures = [
            batcher.submit(request((64, 64), "fine")),
            batcher.submit(bad),
            batcher.submit(request((64, 64), "ok")),
        ]
        assert futures[0].result(timeout=60).text == "fine"
        assert futures[2].result(timeout=60).text == "ok"
        with pytest.raises(RuntimeError, match="out of memory"):
            futures[1].result(timeout=60)
    finally:
        batcher.stop()
