"""Fuzzing the tag parser (tasks/tags.py) with model-output-shaped text: tags, coordinates, delimiters,
control tokens, Hangul, cut anywhere. The parser never raises, and every parse satisfies the invariants
(tests/tag_invariants.py); pixel boxes stay inside the image; the result is valid JSON for the store."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_settings import FUZZ, corpus
from hypothesis import given
from hypothesis import strategies as st
from tag_invariants import assert_invariants

from varco.tasks.schemas import ParsedOutput
from varco.tasks.tag_patterns import CONTROL_TOKENS, VARCO_TAGS
from varco.tasks.tags import parse

COORDS = st.one_of(
    st.floats(min_value=-0.5, max_value=1.5, allow_nan=False).map(lambda v: f"{v:.3f}"),
    st.sampled_from(["0", "1", "1.0", "nan", "inf", "-0", "1e-3", "1e309", "", " ", "0.5.5", "０.５"]),
)
BOX = st.lists(COORDS, min_size=0, max_size=6).map(", ".join)
PIECES = st.one_of(
    st.sampled_from([*VARCO_TAGS, *CONTROL_TOKENS, "<ref>", "</ref>", "<", ">", "</", "<bb", "<del", ",", "\r\n"]),
    BOX,
    st.text(alphabet=st.sampled_from("ab 고양이<>/,.\n\t"), max_size=12),
    st.text(max_size=8),
)
OUTPUT = st.lists(PIECES, max_size=40).map("".join)
SIZES = st.one_of(st.none(), st.tuples(st.integers(1, 9000), st.integers(1, 9000)))


def check(raw: str, image_size: tuple[int, int] | None) -> None:
    out = parse(raw, image_size=image_size)
    assert_invariants(out)
    assert ParsedOutput.model_validate_json(out.model_dump_json()) == out  # what the store keeps reads back
    if image_size is not None:
        width, height = image_size
        for obj in out.objects:
            for x1, y1, x2, y2 in obj.boxes_px or []:
                assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height


@FUZZ
@given(raw=OUTPUT, image_size=SIZES, cut=st.integers(0, 10_000))
def test_any_model_output_parses_within_the_invariants(raw: str, image_size: tuple[int, int] | None, cut: int) -> None:
    check(raw, image_size)
    check(raw[: cut % (len(raw) + 1)], image_size)  # generation stopped anywhere (max_new_tokens)


@pytest.mark.parametrize("path", corpus("tags"), ids=lambda p: p.name)
def test_the_corpus_parses_within_the_invariants(path: Path) -> None:
    raw = path.read_bytes().decode()  # not read_text: it would turn \r\n into \n
    for cut in range(len(raw) + 1):
        check(raw[:cut], (640, 480))
