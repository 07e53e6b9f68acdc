"""What every parse of model output satisfies, whatever the output: shared by the tag parser's property tests
(tests/tasks/test_tags_robust.py) and its fuzzing (tests/fuzz/test_fuzz_tags.py)."""

from __future__ import annotations

from varco.tasks.schemas import ParsedOutput
from varco.tasks.tags import TAG_RE


def assert_invariants(out: ParsedOutput) -> None:
    assert TAG_RE.search(out.text) is None, out.text
    for obj in out.objects:
        start, end = obj.span
        assert 0 <= start <= end <= len(out.text)
        assert out.text[start:end] == obj.label
        for box in obj.boxes:
            assert_box(box)
    for item in out.ocr:
        assert_box(item.box)
        assert TAG_RE.search(item.text) is None


def assert_box(box: tuple[float, float, float, float]) -> None:
    x1, y1, x2, y2 = box
    assert all(0.0 <= v <= 1.0 for v in box), box
    assert x1 <= x2 and y1 <= y2, box
