"""How the hf backend forms batches: budget classes, the token cap, and splitting on out-of-memory."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from varco.workers.engines.base import GenerationOutput, GenerationRequest
from varco.workers.engines.hf import HFEngine
from varco.workers.engines.hf_batching import BatchPolicy, budget_class, padded_tokens


@dataclass
class Row:
    budget: int
    prompt_tokens: int = 100


def test_budget_classes_group_budgets_within_a_factor_of_four() -> None:
    assert [budget_class(b) for b in (1, 8, 64)] == [0, 0, 0]
    assert [budget_class(b) for b in (65, 256)] == [1, 1]
    assert [budget_class(b) for b in (257, 1024)] == [2, 2]
    assert budget_class(8192) > budget_class(1024)


def test_select_takes_the_oldest_and_its_class_mates_only() -> None:
    policy = BatchPolicy(max_batch_size=8, max_batch_tokens=10**9)
    waiting = [Row(100), Row(8192), Row(120), Row(30), Row(200), Row(8000)]
    assert policy.select(waiting) == [0, 2, 4]  # 100, 120, 200: the 8192 and the 30 wait for their own
    assert policy.select(waiting[1:]) == [0, 4]  # the long ones together


def test_select_respects_the_size_and_the_padded_token_cap() -> None:
    rows = [Row(100, prompt_tokens=900) for _ in range(10)]
    assert len(BatchPolicy(max_batch_size=4, max_batch_tokens=10**9).select(rows)) == 4
    # 3 rows x (900 + 100) fit in 3,500; a fourth would not
    assert BatchPolicy(max_batch_size=8, max_batch_tokens=3500).select(rows) == [0, 1, 2]
    # one request is always admitted, however large
    assert BatchPolicy(max_batch_size=8, max_batch_tokens=10).select(rows) == [0]


def test_out_of_memory_lowers_the_cap_below_what_failed() -> None:
    policy = BatchPolicy(max_batch_size=8, max_batch_tokens=100_000)
    failed = [Row(100, 900)] * 4
    policy.out_of_memory(failed)
    assert policy.max_batch_tokens == padded_tokens(failed) // 2 == 2000
    assert len(policy.select([Row(100, 900)] * 8)) == 2


def test_budget_class_boundaries() -> None:
    edges = {1: 0, 64: 0, 65: 1, 256: 1, 257: 2, 1024: 2, 1025: 3, 4096: 3, 4097: 4, 8192: 4}
    assert {budget: budget_class(budget) for budget in edges} == edges


def test_padded_tokens_of_nothing_is_zero_and_rows_pad_to_the_longest() -> None:
    assert padded_tokens([]) == 0
    assert padded_tokens([Row(10, prompt_tokens=5), Row(3, prompt_tokens=50)]) == 2 * (50 + 10)


def test_a_row_left_out_by_the_cap_does_not_stop_smaller_ones_joining() -> None:
    rows = [Row(100, prompt_tokens=100), Row(100, prompt_tokens=5000), Row(100, prompt_tokens=100)]
    assert BatchPolicy(max_batch_size=8, max_batch_tokens=1000).select(rows) == [0, 2]
    assert BatchPolicy(max_batch_size=8, max_batch_tokens=10).select([]) == []


def test_full_means_waiting_longer_cannot_grow_the_batch() -> None:
    policy = BatchPolicy(max_batch_size=2, max_batch_tokens=10**9)
    assert policy.full([Row(100), Row(100)])  # max_batch_size rows: nothing more can join
    assert not policy.full([Row(100)])  # room left: a class mate may still come
    assert not policy.full([Row(100), Row(8192)])  # the one left out is of another class
    assert not policy.full([Row(8192), Row(100)])
    # A class mate already left out by the token cap: it will not fit by waiting either.
    capped = BatchPolicy(max_batch_size=8, max_batch_tokens=2 * 200)
    assert capped.full([Row(100), Row(100), Row(100)])
    assert not capped.full([Row(100), Row(100)])


def test_out_of_memory_halves_in_whole_tokens_and_never_below_one() -> None:
    policy = BatchPolicy(max_batch_size=8, max_batch_tokens=100_000)
    policy.out_of_memory([Row(100, prompt_tokens=901)])
    assert policy.max_batch_tokens == 500 and isinstance(policy.max_batch_tokens, int)
    policy.out_of_memory([Row(1, prompt_tokens=0)])
    assert policy.max_batch_tokens == 1
    policy.out_of_memory([Row(100, prompt_tokens=900)] * 4)  # a larger failure never raises the cap
    assert policy.max_batch_tokens == 1


class FakeModel:
    """Stands in for HFModel on a small GPU: generate fails with CUDA OOM above `memory` padded tokens."""

    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.calls: list[list[str]] = []

    def load(self) -> None:
        pass

    def prepare(self, request: GenerationRequest):
        return type("Prepared", (), {"request": request, "prompt_tokens": 100})()

    def generate(self, prepared, stopping_criteria=None) -> list[GenerationOutput]:
        self.calls.append([p.request.prompt for p in prepared])
        if padded_tokens([Row(p.request.max_new_tokens, p.prompt_tokens) for p in prepared]) > self.memory:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [GenerationOutput(p.request.prompt, p.prompt_tokens, 1, "stop") for p in prepared]


def run(engine: HFEngine, requests: list[GenerationRequest]) -> list[str]:
    """Queue every request, then start the engine (if it is not running): the first batch sees them all."""
    futures = [engine.submit(engine.prepare(r)) for r in requests]
    engine.load()
    return [f.result(timeout=30).text for f in futures]


def request(prompt: str, budget: int) -> GenerationRequest:
    return GenerationRequest(Image.new("RGB", (8, 8)), prompt, budget)


@pytest.fixture
def fake() -> FakeModel:
    return FakeModel(memory=4 * (100 + 200))  # four rows of budget 200 fit, eight do not


def test_out_of_memory_splits_the_batch_and_every_job_still_succeeds(fake: FakeModel) -> None:
    engine = HFEngine("fake", max_batch_size=8, max_wait_ms=0, hf_model=fake)
    try:
        prompts = [f"job {i}" for i in range(8)]
        assert run(engine, [request(p, 200) for p in prompts]) == prompts
        assert [len(c) for c in fake.calls] == [8, 4, 4]  # 8 failed, its halves ran
        assert engine.policy.max_batch_tokens == 8 * 300 // 2  # remembered
        fake.calls.clear()
        engine.max_wait_s = 1.0  # the cap, not the window, cuts the next batch
        later = [f"later {i}" for i in range(8)]
        assert run(engine, [request(p, 200) for p in later]) == later
        assert [len(c) for c in fake.calls] == [4, 4]  # no second out-of-memory
    finally:
        engine.stop()


def test_a_job_too_large_even_alone_fails_with_the_oom_error_and_others_run(fake: FakeModel) -> None:
    engine = HFEngine("fake", max_batch_size=8, max_wait_ms=0, hf_model=fake)
    try:
        fake.memory = 150  # "huge" (100 + 60) does not fit alone; "fine" (100 + 20) does
        futures = [engine.submit(engine.prepare(r)) for r in [request("huge", 60), request("fine", 20)]]
        engine.load()
        with pytest.raises(torch.OutOfMemoryError):
            futures[0].result(timeout=30)
        assert futures[1].result(timeout=30).text == "fine"
    finally:
        engine.stop()


def test_a_long_budget_does_not_hold_short_jobs_in_its_batch(fake: FakeModel) -> None:
    fake.memory = 10**9
    engine = HFEngine("fake", max_batch_size=8, max_wait_ms=0, hf_model=fake)
    try:
        requests = [request("long", 8192), *(request(f"short {i}", 100) for i in range(4))]
        run(engine, requests)
        long_batch = next(c for c in fake.calls if "long" in c)
        assert long_batch == ["long"]
    finally:
        engine.stop()


class BrokenBatches(FakeModel):
    """generate fails (not of memory) for any batch of more than one request, and for the request "bad" alone."""

    def generate(self, prepared, stopping_criteria=None) -> list[GenerationOutput]:
        self.calls.append([p.request.prompt for p in prepared])
        if len(prepared) > 1 or prepared[0].request.prompt == "bad":
            raise ValueError("this batch cannot run")
        return [GenerationOutput(p.request.prompt, p.prompt_tokens, 1, "stop") for p in prepared]


def test_a_failed_batch_reruns_its_requests_one_by_one() -> None:
    model = BrokenBatches(memory=10**9)
    engine = HFEngine("fake", max_batch_size=8, max_wait_ms=0, hf_model=model)
    try:
        futures = [engine.submit(engine.prepare(request(p, 100))) for p in ("a", "bad", "c")]
        engine.load()
        assert futures[0].result(timeout=30).text == "a"
        with pytest.raises(ValueError, match="cannot run"):  # only the request that fails alone fails
            futures[1].result(timeout=30)
        assert futures[2].result(timeout=30).text == "c"
        assert model.calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]  # the batch, then each alone
        assert engine.policy.max_batch_tokens == 65536  # not an out-of-memory: the cap stays
    finally:
        engine.stop()
