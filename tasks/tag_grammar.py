"""The grammar of VARCO-VISION's tag language, one per output shape, for constrained decoding (issue 22).

Written once, beside the parser (`tags.py`), as xgrammar structural tags (plain JSON, so this module
imports no engine code): the hf backend compiles them with xgrammar, vLLM gets the same JSON as
`StructuredOutputsParams.structural_tag` and compiles it with its own xgrammar backend.

Every tag is a `token` format, matched by the special token's id in the model's tokenizer and never
by ordinary text tokens that spell it (a grammar string literal `"<bbox>"` would match the spelling:
xgrammar#314). Free text and labels exclude `<` (except before a digit or `=`, which cannot start a
tag or a control token), so no tag can be spelled out of text either.

Shapes:
- `OCR`: `<char>text</char><bbox>box(<delim>box)*</bbox>` items, whitespace between them.
- `GROUNDED_TEXT`: free text in which `<obj>label</obj><bbox>box(<delim>box)*</bbox>` spans may
  appear (grounding; referring, caption and VQA when constrained).

A box is four numbers in 0..1 in the card's format (`0.014, 0.106, 0.51, 0.996`): `0` or `1`, or
`0.` / `1.` with one to four decimals (`1.` only with zeros), separated by `,` and an optional space.
Reversed corners (`x2 < x1`) need numeric comparison, which a context-free grammar does not express:
they are left to the parser's swap (`box … has reversed corners: swapped`).
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from varco.tasks.prompts import TaskType

__all__ = ["OutputShape", "constraint_for", "shape_for_task", "structural_tag", "structural_tag_json"]


class OutputShape(StrEnum):
    OCR = "ocr"
    """A sequence of `<char>…</char><bbox>…</bbox>` items."""
    GROUNDED_TEXT = "grounded_text"
    """Free text with optional `<obj>…</obj><bbox>…</bbox>` spans."""


# Text with no `<` unless a digit or `=` follows it: no tag, control token or partial tag can be formed.
FREE_TEXT = r"([^<]|<[0-9=])*"
LABEL = r"([^<]|<[0-9=])+"
NUMBER = r"(0|1|0\.[0-9]{1,4}|1\.0{1,4})"
BOX = rf"{NUMBER}, ?{NUMBER}, ?{NUMBER}, ?{NUMBER}"
WHITESPACE = r"\s*"


def _token(tag: str) -> dict[str, Any]:
    return {"type": "token", "token": tag}


def _regex(pattern: str) -> dict[str, Any]:
    return {"type": "regex", "pattern": pattern}


def _sequence(*elements: dict[str, Any]) -> dict[str, Any]:
    return {"type": "sequence", "elements": list(elements)}


def _star(content: dict[str, Any]) -> dict[str, Any]:
    return {"type": "star", "content": content}


def _phrase_with_boxes(open_tag: str, close_tag: str) -> dict[str, Any]:
    """`<obj>label</obj><bbox>box(<delim>box)*</bbox>` (or `<char>`)."""
    return _sequence(
        _token(open_tag),
        _regex(LABEL),
        _token(close_tag),
        _regex(WHITESPACE),
        _token("<bbox>"),
        _regex(BOX),
        _star(_sequence(_token("<delim>"), _regex(BOX))),
        _token("</bbox>"),
    )


def _format(shape: OutputShape) -> dict[str, Any]:
    if shape is OutputShape.OCR:
        item = _phrase_with_boxes("<char>", "</char>")
        return _sequence(_regex(WHITESPACE), _star(_sequence(item, _regex(WHITESPACE))))
    span = _phrase_with_boxes("<obj>", "</obj>")
    return _sequence(_regex(FREE_TEXT), _star(_sequence(span, _regex(FREE_TEXT))))


def structural_tag(shape: OutputShape) -> dict[str, Any]:
    """The xgrammar structural tag of one output shape."""
    return {"type": "structural_tag", "format": _format(shape)}


def structural_tag_json(shape: OutputShape) -> str:
    """The same, as the JSON string xgrammar and vLLM take (stable: it is also the cache key)."""
    return json.dumps(structural_tag(shape), sort_keys=True, separators=(",", ":"))


def shape_for_task(task: TaskType) -> OutputShape:
    """OCR answers are OCR items; every other task answers free text with optional grounding spans."""
    return OutputShape.OCR if task is TaskType.OCR else OutputShape.GROUNDED_TEXT


# The tasks VARCO_CONSTRAINED_TAGS=on constrains: those whose answers are mostly tags.
CONSTRAINED_BY_DEFAULT = frozenset({TaskType.GROUNDING, TaskType.OCR})


def constraint_for(task: TaskType, constrained: bool | None, default: str = "on") -> OutputShape | None:
    """The grammar a job decodes under, or None: the job's own `constrained` flag, else the setting's
    default (`on`: grounding and OCR, `all`: every task, `off`: none)."""
    if constrained is None:
        constrained = default == "all" or (default == "on" and task in CONSTRAINED_BY_DEFAULT)
    return shape_for_task(task) if constrained else None
