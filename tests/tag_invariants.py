"""What every parse of model output satisfies, whatever the output: shared by the tag parser's property tests
(tests/tasks/test_tags_robust.py) and its fuzzing (tests/fuzz/test_fuzz_tags.py); and what a parse of an
answer decoded under the tag grammar satisfies (`broken_rules`: tests/integration/test_constrained_worker.py,
tests/workers/engines/test_tag_constraint_engines.py)."""

from __future__ import annotations

import re

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


# Issue 22, section 3: what an answer decoded under the tag grammar may still say. A job cut by its
# budget may say that it was cut (the parser's `output ends …`, the worker's max_new_tokens notice),
# that its last item lost its box, and that corners were swapped (left to the parser by design).
CUT_WARNINGS = ("output ends ", "output stopped at max_new_tokens=")
LAST_ITEM_WARNINGS = ("has no <bbox>", "no valid box for ")
SWAPPED = "has reversed corners: swapped"
_BBOX = re.compile(r"<bbox>(.*?)(</bbox>|$)", re.S)


def boxes_written(raw: str) -> int:
    """The boxes the raw text holds: every group of a closed `<bbox>`, all but the last of one the budget
    cut (that group may itself be cut, so the parser drops it and says so)."""
    count = 0
    for match in _BBOX.finditer(raw):
        groups = match.group(1).split("<delim>")
        count += len(groups) if match.group(2) else len(groups) - 1
    return count


def boxes_kept(out: ParsedOutput) -> int:
    return sum(len(obj.boxes) for obj in out.objects) + len(out.ocr)


def broken_rules(out: ParsedOutput, finish_reason: str | None) -> list[str]:
    """The section-3 rules this parse breaks; none for an answer that always parses. `out` is the parse of
    the raw text, or a worker's result output (which adds the max_new_tokens notice to a cut answer)."""
    broken = []
    if finish_reason == "stop":
        broken += out.warnings  # an answer ended by EOS says nothing
    else:
        last_item = [w for w in out.warnings if any(s in w for s in LAST_ITEM_WARNINGS)]
        broken += [w for w in out.warnings if not w.startswith(CUT_WARNINGS) and not w.endswith(SWAPPED)
                   and w not in last_item]  # fmt: skip
        broken += last_item if len(last_item) > 1 else []  # the last item only
    if (kept := boxes_kept(out)) != (written := boxes_written(out.raw)):
        broken.append(f"{written} boxes written, {kept} kept")  # a box dropped without a word
    return broken
