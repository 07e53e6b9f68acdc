"""The parser never raises on truncated or malformed output, and its invariants always hold.

Property tests run without hypothesis' per-example deadline: on a loaded machine (or under mutmut's
trampolines) a slow example is not a failure.
"""

from __future__ import annotations

import re

from helpers import card_output
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tag_invariants import assert_invariants

from varco.tasks.tags import parse, render_object

GROUNDING = card_output("grounding")
OCR = card_output("ocr")


def test_every_truncation_of_the_grounding_example() -> None:
    full = parse(GROUNDING, image_size=(640, 480))
    for cut in range(len(GROUNDING) + 1):  # every one of the 599 prefixes, not a sample
        out = parse(GROUNDING[:cut], image_size=(640, 480))
        assert_invariants(out)
        # Whatever survives is a prefix of the full parse: never an invented object, label or box.
        assert len(out.objects) <= len(full.objects), cut
        for got, want in zip(out.objects, full.objects, strict=False):
            assert want.label.startswith(got.label), cut
            assert set(got.boxes) <= set(want.boxes), cut


def test_every_truncation_of_the_ocr_example() -> None:
    full = [(i.text, i.box) for i in parse(OCR).ocr]
    for cut in range(len(OCR) + 1):  # every one of the 928 prefixes
        out = parse(OCR[:cut])
        assert_invariants(out)
        got = [(i.text, i.box) for i in out.ocr]
        assert got == full[: len(got)], cut  # a prefix of the full reading, in order


def test_cut_inside_coordinates_drops_the_cut_box_only() -> None:
    out = parse("The image shows <obj>two cats</obj><bbox>0.014, 0.106, 0.51, 0.996<delim>0.51, 0.054, 0.9")
    assert out.text == "The image shows two cats"
    assert out.objects[0].boxes == [(0.014, 0.106, 0.51, 0.996)]
    assert any("ends inside <bbox>" in w for w in out.warnings)


def test_cut_right_after_delim() -> None:
    out = parse("<obj>cats</obj><bbox>0.1, 0.1, 0.5, 0.5<delim>")
    assert out.objects[0].boxes == [(0.1, 0.1, 0.5, 0.5)]


def test_cut_inside_a_tag_name() -> None:
    out = parse("two cats lying on <obj>a pink blanket</obj><bb")
    assert out.text == "two cats lying on a pink blanket"
    assert out.objects[0].label == "a pink blanket" and out.objects[0].boxes == []
    assert any("partial tag" in w for w in out.warnings)


def test_cut_inside_a_phrase_keeps_the_text() -> None:
    out = parse("The image shows <obj>two ca")
    assert out.text == "The image shows two ca" and out.objects == []
    assert out.warnings


def test_out_of_range_and_reversed_coordinates_are_repaired() -> None:
    out = parse("<obj>a</obj><bbox>1.2, 0.9, -0.1, 0.2</bbox>")
    assert out.objects[0].boxes == [(0.0, 0.2, 1.0, 0.9)]
    assert len(out.warnings) == 2


def test_non_numeric_coordinates_drop_the_box() -> None:
    out = parse("<obj>a</obj><bbox>0.1, zero, 0.3, 0.4</bbox> and more")
    assert out.text == "a and more"
    assert out.objects[0].boxes == []
    assert any("four numbers" in w for w in out.warnings)


def test_orphan_and_nested_tags() -> None:
    out = parse("x </obj> y <obj>outer <obj>inner</obj><bbox>0.1,0.1,0.2,0.2</bbox> z <delim> </bbox>")
    assert out.text == "x  y outer inner z"
    assert [o.label for o in out.objects] == ["outer inner"]
    assert len(out.warnings) >= 3


def test_bbox_without_phrase_is_kept_unlabelled() -> None:
    out = parse("look <bbox>0.1, 0.2, 0.3, 0.4</bbox> here")
    assert out.text == "look  here"
    assert out.objects[0].label == "" and out.objects[0].boxes == [(0.1, 0.2, 0.3, 0.4)]


def test_crlf_and_odd_spacing() -> None:
    out = parse("line one\r\n< obj > a  cat </OBJ><bbox>  0.1 ,0.2,0.3 ,  0.4 </bbox>\r\nend")
    assert out.text == "line one\n a  cat \nend"
    assert out.objects[0].label == "a  cat"
    assert out.objects[0].boxes == [(0.1, 0.2, 0.3, 0.4)]
    assert "\r" not in out.text


def test_tags_formed_by_removal_are_removed_too() -> None:
    out = parse("a <<obj>obj>b</obj><bbox>0.1,0.1,0.2,0.2</bbox>")
    assert_invariants(out)
    assert "<obj>" not in out.text


def test_control_tokens_are_stripped() -> None:
    assert parse("done<|im_end|>").text == "done" and parse("done<|im_end|>").warnings == []
    out = parse("a<|im_start|>b<image>c")
    assert out.text == "abc" and out.warnings


def test_char_with_delim_gives_one_item_per_box() -> None:
    out = parse("<char>EXIT</char><bbox>0.1,0.1,0.2,0.2<delim>0.5,0.5,0.6,0.6</bbox>")
    assert [(i.text, i.box) for i in out.ocr] == [("EXIT", (0.1, 0.1, 0.2, 0.2)), ("EXIT", (0.5, 0.5, 0.6, 0.6))]


# --- property-based ---------------------------------------------------------------------------

coord = st.integers(0, 1000).map(lambda v: v / 1000)


@st.composite
def boxes(draw: st.DrawFn) -> tuple[float, float, float, float]:
    x1, x2 = sorted((draw(coord), draw(coord)))
    y1, y2 = sorted((draw(coord), draw(coord)))
    return (x1, y1, x2, y2)


plain = st.text(st.characters(blacklist_characters="<>\r", blacklist_categories=("Cs",)), max_size=30)
label = plain.map(str.strip).filter(bool)
segment = st.one_of(
    plain.map(lambda t: ("text", t)),
    st.tuples(st.just("obj"), label, st.lists(boxes(), min_size=1, max_size=3)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(segment, max_size=8))
def test_render_then_parse_gives_the_same_structure(segments: list) -> None:
    raw, text, expected = "", "", []
    for seg in segments:
        if seg[0] == "text":
            raw += seg[1]
            text += seg[1]
        else:
            _, name, bxs = seg
            raw += render_object(name, bxs)
            expected.append((name, (len(text), len(text) + len(name)), bxs))
            text += name
    out = parse(raw)
    lead = len(text) - len(text.lstrip())
    assert out.text == text.strip()
    assert [(o.label, o.span, o.boxes) for o in out.objects] == [
        (n, (s - lead, e - lead), b) for n, (s, e), b in expected
    ]
    assert out.warnings == []


@st.composite
def ocr_lines(draw: st.DrawFn) -> list[tuple[str, tuple[float, float, float, float]]]:
    return draw(st.lists(st.tuples(label, boxes()), max_size=10))


@settings(max_examples=200, deadline=None)
@given(ocr_lines())
def test_ocr_render_then_parse(lines: list) -> None:
    raw = "\n".join(render_object(t, [b], tag="char") for t, b in lines)
    assert [(i.text, i.box) for i in parse(raw).ocr] == lines


tagged_noise = st.lists(
    st.one_of(
        st.sampled_from(["<obj>", "</obj>", "<bbox>", "</bbox>", "<delim>", "<char>", "</char>", "<gro>", "<ocr>",
                         "<|im_end|>", "<image>", "< obj >", "<", ">", "0.5, ", "1.5,", "-0.2", "\r\n", " ", "abc"]),
        st.text(max_size=10),
        st.floats(allow_nan=True, allow_infinity=True).map(str),
    ),
    max_size=40,
).map("".join)  # fmt: skip


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), tagged_noise))
def test_arbitrary_input_never_raises_and_invariants_hold(raw: str) -> None:
    out = parse(raw, image_size=(640, 480))
    assert_invariants(out)
    assert out.raw == raw
    for obj in out.objects:
        assert obj.boxes_px is not None and len(obj.boxes_px) == len(obj.boxes)
        for x1, y1, x2, y2 in obj.boxes_px:
            assert 0 <= x1 <= x2 <= 640 and 0 <= y1 <= y2 <= 480


def test_no_known_tag_spelling_survives() -> None:
    out = parse("<OBJ>A</Obj><BBOX>0.1,0.1,0.2,0.2</BBOX> <  delim  >")
    assert re.search(r"(?i)obj|bbox|delim", out.text) is None
