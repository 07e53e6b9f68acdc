"""Each repair the parser makes, pinned: the exact text, spans, boxes and warnings it returns.

`tags_repairs.json` holds one case per repair branch of `tasks/tags.py` (orphan and nested tags,
a phrase without a box, boxes cut, empty, short, stray, overflowing, outside 0..1 or reversed,
partial tags, control and task tokens, tags formed by removal, spacing, OCR with several boxes),
each as [raw, image_size, expected parse]. The expected results were read and checked by hand when
each case was added; a change to any of them is a change of the parser's contract.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from varco.tasks.tags import parse, render_box, render_coord, render_object, to_pixels

CASES = json.loads((Path(__file__).with_name("tags_repairs.json")).read_text(encoding="utf-8"))


@pytest.mark.parametrize(("raw", "image_size", "expected"), CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_each_repair_gives_the_documented_result(raw: str, image_size: list[int] | None, expected: dict) -> None:
    got = parse(raw, tuple(image_size) if image_size else None)
    assert json.loads(got.model_dump_json()) == expected


def test_rendering_boxes_the_way_the_model_writes_them() -> None:
    assert [render_coord(v) for v in (0.51, 1.0, 0.0, 0.014, 0.1234, 0.9996)] == [
        "0.51", "1.0", "0.0", "0.014", "0.123", "1.0",
    ]  # fmt: skip
    assert render_box((0.1, 0.25, 1.0, 0.5)) == "0.1, 0.25, 1.0, 0.5"
    assert render_object("cat", [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)]) == (
        "<obj>cat</obj><bbox>0.0, 0.0, 0.5, 0.5<delim>0.5, 0.5, 1.0, 1.0</bbox>"
    )
    assert (
        render_object("백범로", [(0.1, 0.2, 0.3, 0.4)], tag="char")
        == "<char>백범로</char><bbox>0.1, 0.2, 0.3, 0.4</bbox>"
    )
    # What is rendered parses back to the same boxes.
    assert parse(render_object("cat", [(0.014, 0.106, 0.51, 0.996)])).objects[0].boxes == [(0.014, 0.106, 0.51, 0.996)]


def test_pixels_round_half_up_and_stay_inside_the_image() -> None:
    assert to_pixels((0.5, 0.5, 1.0, 1.0), (3, 5)) == (2, 3, 3, 5)  # 1.5 -> 2, 2.5 -> 3
    assert to_pixels((0.0, 0.1, 0.49, 0.999), (10, 1000)) == (0, 100, 5, 999)
    assert to_pixels((0.9999, 0.9999, 1.0, 1.0), (100, 100)) == (100, 100, 100, 100)
