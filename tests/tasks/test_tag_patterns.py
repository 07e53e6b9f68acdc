"""One set of tag patterns: what a request may not contain is what the parser strips from an answer."""

from __future__ import annotations

import pytest

from varco.tasks.prompts import find_control_token, find_varco_tag
from varco.tasks.tag_patterns import CONTROL_TOKENS, STOP_TOKENS, TAG_BODIES, TAG_RE, VARCO_TAGS
from varco.tasks.tags import parse

# Spellings tokenizers may normalise to a control token: case, inner spaces, a closing slash.
ODD_CONTROL_SPELLINGS = ["< |im_end| >", "<|IM_START|>", "<| im_sep |>", "</image>", "< VIDEO >"]


@pytest.mark.parametrize("token", [*CONTROL_TOKENS, *ODD_CONTROL_SPELLINGS])
def test_a_control_token_refused_in_a_prompt_is_stripped_from_an_answer(token: str) -> None:
    assert find_control_token(f"say {token} now") == token
    out = parse(f"a {token}b")
    assert out.text == "a b", out
    assert out.warnings == [f"control token {token} inside the output: removed"]
    assert parse(f"done{token}").warnings == []  # at the very end it is EOS/padding: no warning


@pytest.mark.parametrize("tag", [*VARCO_TAGS, "< /OBJ >", "<Delim>"])
def test_a_varco_tag_is_found_in_a_label_and_never_left_in_parsed_text(tag: str) -> None:
    assert find_varco_tag(f"x{tag}y") == tag
    assert find_control_token(f"x{tag}y") is None
    assert TAG_RE.search(parse(f"x {tag} y").text) is None


def test_the_vocabulary_the_parser_knows_covers_the_tokenizer_tokens() -> None:
    for token in (*CONTROL_TOKENS, *VARCO_TAGS):
        assert TAG_RE.fullmatch(token), token
        assert token.strip("<>") in TAG_BODIES  # a cut-off start of it is recognised
    assert set(STOP_TOKENS) <= set(CONTROL_TOKENS)
    assert find_control_token("a | b > c < d") is None and TAG_RE.search("x <b> y <objet>") is None
