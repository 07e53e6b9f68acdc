"""The delta decoder both engines feed a streamed request's ids to, with a fake tokenizer."""

from __future__ import annotations

from varco.workers.engines.deltas import DeltaDecoder

STOP = 0
# Id 5 is the first byte of a two-byte character: alone it decodes to U+FFFD, with 6 to "é".
PIECES = {1: "<obj>", 2: "cat", 3: " ", 4: "</obj>"}


class Tokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        assert skip_special_tokens is False  # the tags are special tokens: the deltas keep them
        text = "".join(PIECES.get(i, "") for i in ids if i not in (5, 6))
        if 5 in ids:
            text += "é" if 6 in ids else "\ufffd"
        return text


def stream(steps: list[list[int]], budget: int = 100) -> list[str]:
    sent: list[str] = []
    decoder = DeltaDecoder(sent.append, Tokenizer(), {STOP}, budget)
    for ids in steps:
        decoder.update(ids)
    return sent


def test_each_step_sends_what_the_text_gained_with_its_tags() -> None:
    assert stream([[1], [1, 2], [1, 2, 4], [1, 2, 4, STOP], [1, 2, 4, STOP, STOP]]) == ["<obj>", "cat", "</obj>"]


def test_trailing_space_and_half_characters_wait_for_the_next_step() -> None:
    # the final text is stripped, and U+FFFD is a character not finished yet: neither is ever sent early
    assert stream([[3], [3, 2], [3, 2, 3], [3, 2, 3, 5], [3, 2, 3, 5, 6]]) == ["cat", " é"]


def test_ids_past_the_budget_or_a_stop_never_reach_the_text() -> None:
    assert stream([[2, 2, 2]], budget=2) == ["catcat"]
    assert stream([[2, STOP, 1]]) == ["cat"]


def test_a_rerun_sends_only_what_it_adds_and_a_failing_listener_is_contained() -> None:
    assert stream([[1, 2], [1], [1, 2], [1, 2, 4]]) == ["<obj>cat", "</obj>"]  # a batch rerun one by one
    assert stream([[1, 2], [2, 2, 2], [1, 2, 4]]) == ["<obj>cat", "</obj>"]  # a rerun that wrote otherwise: not sent

    def broken(text: str) -> None:
        raise RuntimeError("redis is away")

    DeltaDecoder(broken, Tokenizer(), {STOP}, 10).update([1])  # logged, never raised into the engine thread
