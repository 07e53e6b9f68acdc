"""The tag grammars (tasks/tag_grammar.py) against the parser's own cases, at the token level.

Text is tokenised with the tiny model's tokenizer, which carries VARCO's tags as special tokens as
the 14B's does: a tag written in a case becomes its special token's id, so the grammar is checked
exactly as the engines apply it. An answer is accepted when every id and then the stop token are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import card_output

from varco.tasks.prompts import TaskType
from varco.tasks.tag_grammar import OutputShape, shape_for_task, structural_tag_json
from varco.tasks.tags import parse
from varco.workers.devtools.tiny_model import build_tokenizer
from varco.workers.engines.tag_constraint import TagGrammars

CASES = json.loads((Path(__file__).parents[2] / "tasks" / "tags_repairs.json").read_text(encoding="utf-8"))
TOKENIZER = build_tokenizer()
STOP_IDS = TOKENIZER.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
GRAMMARS = TagGrammars(TOKENIZER, len(TOKENIZER), STOP_IDS)

# Parser cases without a warning that the grammar refuses on purpose, and why.
REFUSED_ON_PURPOSE = {
    "hello <xyz": "free text never holds `<` before a letter: it could be the start of a spelled-out tag",
    "</bbox> x": "a stray closing tag: the parser drops it silently, the grammar never emits it",
    "x\r\ny\rz <OBJ>q</ obj ><BBOX>0,0,0.5,0.5</bbox>": "tags spelled out of text tokens",
}
# Parser cases without a warning that are cut short: a prefix of a sentence, not a whole one.
CUT_SHORT = {"<obj>a</obj><bbox>0.1,0.1,0.2,0.2<delim>"}


def ids(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


def accepted(text: str, shape: OutputShape) -> bool:
    """The whole answer, ended by the stop token (a stop token already at its end is that stop)."""
    tokens = ids(text)
    while tokens and tokens[-1] in STOP_IDS:
        tokens.pop()
    return GRAMMARS.accepts([*tokens, STOP_IDS[0]], shape)


def accepted_as_prefix(text: str, shape: OutputShape) -> bool:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(GRAMMARS.get(shape))
    return all(matcher.accept_token(t) for t in ids(text))


def shape_of(text: str) -> OutputShape:
    return OutputShape.OCR if "<char>" in text else OutputShape.GROUNDED_TEXT


def test_tags_are_single_special_tokens_in_the_tokenizer() -> None:
    assert len(ids("<obj>a</obj><bbox>")) == 4


@pytest.mark.parametrize(
    ("name", "shape"),
    [("grounding", OutputShape.GROUNDED_TEXT), ("ocr", OutputShape.OCR), ("referring", OutputShape.GROUNDED_TEXT)],
)
def test_every_card_example_is_accepted_by_its_shape_only(name: str, shape: OutputShape) -> None:
    text = card_output(name)
    assert accepted(text, shape)
    other = OutputShape.OCR if shape is OutputShape.GROUNDED_TEXT else OutputShape.GROUNDED_TEXT
    assert not accepted(text, other) or (name == "referring" and other is OutputShape.GROUNDED_TEXT)


CLEAN = [raw for raw, _, expected in CASES if not expected["warnings"]]
REPAIRED = [raw for raw, _, expected in CASES if expected["warnings"]]


@pytest.mark.parametrize("raw", CLEAN, ids=[f"clean{i}" for i in range(len(CLEAN))])
def test_every_parser_case_without_a_repair_is_accepted(raw: str) -> None:
    if raw in REFUSED_ON_PURPOSE:
        assert not accepted(raw, shape_of(raw)), REFUSED_ON_PURPOSE[raw]
    elif raw in CUT_SHORT:
        assert accepted_as_prefix(raw, shape_of(raw)) and not accepted(raw, shape_of(raw))
    else:
        assert accepted(raw, shape_of(raw))


@pytest.mark.parametrize("raw", REPAIRED, ids=[f"repair{i}" for i in range(len(REPAIRED))])
def test_every_kind_of_repair_is_refused_by_both_shapes(raw: str) -> None:
    assert not any(accepted(raw, shape) for shape in OutputShape)


@pytest.mark.parametrize(
    "text",
    [
        "<obj>a</obj><bbox>0.1, 0.2, 0.3</bbox>",  # three numbers
        "<obj>a</obj><bbox>0.1, 0.2, 0.3, 1.5</bbox>",  # outside 0..1
        "<obj>a</obj><bbox>0.1, 0.2, 0.3, 1.2</bbox>",  # 1. with a non-zero decimal
        "<obj>a</obj><bbox>.1, 0.2, 0.3, 0.4</bbox>",  # not the card's number format
        "<obj>a</obj><bbox>0.1, 0.2, 0.3, 0.4",  # never closed
        "<obj>a<bbox>0.1, 0.2, 0.3, 0.4</bbox>",  # phrase never closed
        "<obj></obj><bbox>0.1, 0.2, 0.3, 0.4</bbox>",  # empty label
        "see <bbox>0.1, 0.2, 0.3, 0.4</bbox>",  # a box with no phrase
        "a <|im_start|> b",  # a control token inside
        "a <delim> b",  # delim outside a box
    ],
)
def test_malformed_grounding_is_refused(text: str) -> None:
    assert not accepted(text, OutputShape.GROUNDED_TEXT)


SPECIAL = list(range(256, len(TOKENIZER)))  # the tiny tokenizer: 256 byte tokens, then the special ones
TAGS = TOKENIZER.convert_ids_to_tokens(SPECIAL)


def spelled(text: str) -> list[int]:
    """`text` in ordinary text tokens only: each character on its own, so every tag is spelled out."""
    return [t for char in text for t in ids(char)]


def allowed_after(tokens: list[int], shape: OutputShape) -> set[int]:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(GRAMMARS.get(shape))
    assert all(matcher.accept_token(t) for t in tokens)
    bitmask = xgr.allocate_token_bitmask(1, len(TOKENIZER))
    matcher.fill_next_token_bitmask(bitmask)
    return {i for i in range(len(TOKENIZER)) if (int(bitmask[0, i // 32]) >> (i % 32)) & 1}


@pytest.mark.parametrize(("name", "shape"), [("grounding", OutputShape.GROUNDED_TEXT), ("ocr", OutputShape.OCR)])
def test_a_card_answer_with_its_tags_spelled_out_of_text_tokens_is_refused(name: str, shape: OutputShape) -> None:
    text = card_output(name)
    assert accepted(text, shape)  # with the tags' own tokens
    tokens = spelled(text)
    assert TOKENIZER.decode(tokens) == text and not set(tokens) & set(SPECIAL)  # the same text, no tag token
    assert not any(GRAMMARS.accepts([*tokens, STOP_IDS[0]], s) for s in OutputShape)


@pytest.mark.parametrize(
    ("before", "shape"),
    [
        ("x <", OutputShape.GROUNDED_TEXT),  # free text
        ("<obj>a <", OutputShape.GROUNDED_TEXT),  # a grounding label
        ("<char>a <", OutputShape.OCR),  # an OCR item's text
    ],
)
def test_after_a_text_lt_no_token_can_go_on_to_spell_a_tag(before: str, shape: OutputShape) -> None:
    """The step where a spelled-out tag would begin: after `<` as text, the mask keeps a digit and `=`
    (`x <3`, `a<=b`) and refuses the next character of every tag the tokenizer knows (`o` of `<obj>`, `/`
    of `</bbox>`, `|` of `<|im_end|>` …)."""
    tokens = ids(before)
    assert tokens[-1] not in SPECIAL  # the `<` is a text token
    allowed = allowed_after(tokens, shape)
    assert {*ids("3"), *ids("=")} <= allowed
    tag_continuations = {ids(tag[1])[0] for tag in TAGS}
    assert len(tag_continuations) >= 5 and not allowed & tag_continuations


def test_a_comparison_in_free_text_is_accepted() -> None:
    assert accepted("x <3 and a<=b", OutputShape.GROUNDED_TEXT)


def test_reversed_corners_are_left_to_the_parser() -> None:
    text = "<obj>a</obj><bbox>0.5, 0.5, 0.1, 0.1</bbox>"
    assert accepted(text, OutputShape.GROUNDED_TEXT)
    assert parse(text).warnings == ["box '0.5, 0.5, 0.1, 0.1' has reversed corners: swapped"]


def test_ocr_items_may_carry_several_boxes_and_an_empty_page_is_fine() -> None:
    assert accepted("<char>ab</char><bbox>0.1, 0.1, 0.2, 0.2<delim>0.3, 0.3, 0.4, 0.4</bbox>", OutputShape.OCR)
    assert accepted("", OutputShape.OCR)
    assert not accepted("free text", OutputShape.OCR)


def test_shapes_by_task_and_the_json_is_stable() -> None:
    assert shape_for_task(TaskType.OCR) is OutputShape.OCR
    assert {shape_for_task(t) for t in TaskType if t is not TaskType.OCR} == {OutputShape.GROUNDED_TEXT}
    assert structural_tag_json(OutputShape.OCR) == structural_tag_json(OutputShape.OCR)
    assert '"token":"<bbox>"' in structural_tag_json(OutputShape.OCR)


def test_each_shape_compiles_once_per_process() -> None:
    grammars = TagGrammars(TOKENIZER, len(TOKENIZER), STOP_IDS)
    for _ in range(3):
        for shape in OutputShape:
            grammars.get(shape)
    assert grammars.stats.compiles == 2 and grammars.stats.cache_hits == 4


def allowed_tags_after_text(compiled: object) -> set[str]:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    assert all(matcher.accept_token(t) for t in ids("abc"))
    bitmask = xgr.allocate_token_bitmask(1, len(TOKENIZER))
    matcher.fill_next_token_bitmask(bitmask)
    special = range(256, len(TOKENIZER))
    return {TOKENIZER.convert_ids_to_tokens(i) for i in special if (int(bitmask[0, i // 32]) >> (i % 32)) & 1}


def test_grounding_allows_obj_and_not_char_whichever_shape_compiled_first() -> None:
    grammars = TagGrammars(TOKENIZER, len(TOKENIZER), STOP_IDS)
    grammars.get(OutputShape.OCR)
    assert allowed_tags_after_text(grammars.get(OutputShape.GROUNDED_TEXT)) == {"<obj>", "<|im_end|>", "<|endoftext|>"}


def test_xgrammar_compiler_cache_still_conflates_token_formats() -> None:
    """Why TagGrammars compiles each shape with its own cache-less compiler (xgrammar 0.2.8). When this
    fails, xgrammar fixed it: one shared compiler, and vLLM's structured outputs, become usable."""
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(GRAMMARS._info)
    compiler.compile_structural_tag(structural_tag_json(OutputShape.OCR))
    grounding = compiler.compile_structural_tag(structural_tag_json(OutputShape.GROUNDED_TEXT))
    assert "<char>" in allowed_tags_after_text(grounding)
