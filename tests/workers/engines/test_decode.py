"""The engine output step both backends end a request with, and the dtype rule both load weights by.

A small fake tokenizer stands in for the real one: what is pinned here is the cut at the first stop
token, the decode with the tags kept, and how the finish reason follows from the ids and the budget.
"""

from __future__ import annotations

from typing import Any

import pytest

from varco.workers.engines import base
from varco.workers.engines.base import GenerationOutput, weights_dtype
from varco.workers.engines.decode import stop_token_ids, to_output

EOT, EOS, PAD, UNK = 7, 8, 9, 0


class FakeTokenizer:
    """Ids 1-6 are the letters a-f, 10 is the <obj> tag (special); 7, 8 and 9 end an answer."""

    unk_token_id: int | None = UNK

    def __init__(self, vocab: dict[str, int] | None = None, eos: Any = EOS, pad: Any = PAD) -> None:
        self.vocab = {"<|im_end|>": EOT, "<|endoftext|>": PAD} if vocab is None else vocab
        self.eos_token_id, self.pad_token_id = eos, pad
        self.decoded: list[tuple[list[int], bool]] = []

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.vocab.get(token, self.unk_token_id)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        self.decoded.append((ids, skip_special_tokens))
        return " " + "".join("<obj>" if i == 10 else "abcdef"[i - 1] for i in ids) + "\n"


def test_the_stop_ids_are_end_of_turn_end_of_text_eos_pad_and_the_generation_configs() -> None:
    tokenizer = FakeTokenizer()
    assert stop_token_ids(tokenizer) == [EOT, EOS, PAD]
    assert stop_token_ids(tokenizer, 12) == [EOT, EOS, PAD, 12]
    assert stop_token_ids(tokenizer, [12, EOT, 3]) == [3, EOT, EOS, PAD, 12]


def test_tokens_the_vocabulary_lacks_are_no_stop_ids() -> None:
    # No <|endoftext|>: convert_tokens_to_ids answers the unknown token's id, which must not end answers.
    assert stop_token_ids(FakeTokenizer({"<|im_end|>": EOT}, pad=None)) == [EOT, EOS]
    no_unk = FakeTokenizer({}, eos=-1, pad=None)
    no_unk.unk_token_id = None
    assert stop_token_ids(no_unk, [EOT]) == [EOT]


def test_the_answer_is_cut_at_the_first_stop_token_and_decoded_with_its_tags() -> None:
    tokenizer = FakeTokenizer()
    out = to_output(
        [10, 1, 2, EOT, 3, PAD, PAD], tokenizer=tokenizer, stop_ids={EOT, PAD}, prompt_tokens=42, budget=100
    )
    assert out == GenerationOutput(text="<obj>ab", prompt_tokens=42, output_tokens=3, finish_reason="stop")
    assert tokenizer.decoded == [([10, 1, 2], False)]  # skip_special_tokens=False: the tags are special tokens


@pytest.mark.parametrize(
    ("ids", "budget", "tokens", "reason"),
    [
        ([1, 2, 3], 3, 3, "length"),  # the budget ran out (vLLM: max_tokens)
        ([1, 2, 3, EOT, PAD], 3, 3, "length"),  # hf: EOS forced on the row right after its budget
        ([1, 2, EOT], 3, 2, "stop"),  # the model ended on its last allowed token
        ([1, 2], 5, 2, "length"),  # no stop token and no room left (vLLM: max_model_len)
        ([EOT], 5, 0, "stop"),  # an empty answer
        ([], 5, 0, "length"),
    ],
)  # fmt: skip
def test_the_finish_reason_follows_from_the_ids_and_the_budget(
    ids: list[int], budget: int, tokens: int, reason: str
) -> None:
    out = to_output(ids, tokenizer=FakeTokenizer(), stop_ids=[EOT, PAD], prompt_tokens=1, budget=budget)
    assert (out.output_tokens, out.finish_reason) == (tokens, reason)


def test_auto_weights_are_bfloat16_on_cuda_and_float32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert weights_dtype("auto", "cuda:1") == "bfloat16" and weights_dtype("auto", "cpu") == "float32"
    assert weights_dtype("float16", "cpu") == "float16" and weights_dtype("float32", "cuda") == "float32"
    for available, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(base, "cuda_available", lambda available=available: available)
        assert weights_dtype("auto") == dtype
