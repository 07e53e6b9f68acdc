"""The engine output step: what an engine generated for one request -> the engine-neutral `GenerationOutput`.

Both backends end every request here, as vLLM v1 ends its requests in one output processor: the
generated ids are cut at the first stop token, decoded once with the VARCO tags kept
(`skip_special_tokens=False`: the tags are special tokens and would vanish otherwise), and the
finish reason is derived from the ids and the request's budget, the same way for both. So the
backends cannot drift apart on what an answer is, which tokens end it, or why it ended.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from varco.tasks.tag_patterns import STOP_TOKENS
from varco.workers.engines.base import GenerationOutput

__all__ = ["stop_token_ids", "to_output"]


def stop_token_ids(tokenizer: Any, generation_eos: int | Sequence[int] | None = None) -> list[int]:
    """The ids that end an answer, sorted: `STOP_TOKENS` (end of turn, end of text), the tokenizer's
    EOS and padding, and the EOS ids of the model's generation config. A token the vocabulary lacks
    (no id, or the unknown token's) is left out."""
    ids = {tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS}
    ids |= {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids |= {generation_eos} if isinstance(generation_eos, int) else set(generation_eos or ())
    unknown = getattr(tokenizer, "unk_token_id", None)
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != unknown)


def to_output(
    token_ids: Sequence[int], *, tokenizer: Any, stop_ids: Collection[int], prompt_tokens: int, budget: int
) -> GenerationOutput:
    """One request's output from its generated ids (prompt excluded; stop and padding ids may follow).

    `finish_reason` is "stop" when a stop token ended the answer within its `budget` of new tokens,
    else "length": the budget ran out (the hf backend forces EOS right after it), or the engine had
    no room left (vLLM's max_model_len).
    """
    ids = list(token_ids)
    end = next((i for i, token in enumerate(ids) if token in stop_ids), len(ids))
    text = tokenizer.decode(ids[:end], skip_special_tokens=False)
    stopped = end < len(ids) and end < budget
    return GenerationOutput(
        text=text.strip(),
        prompt_tokens=prompt_tokens,
        output_tokens=end,
        finish_reason="stop" if stopped else "length",
    )
