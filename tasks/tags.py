"""Parse VARCO-VISION's tagged output into structured data, and render boxes back into tags.

Conventions (model card): `<obj>phrase</obj><bbox>x1, y1, x2, y2</bbox>`, several boxes of one
phrase joined by `<delim>`; OCR lines `<char>text</char><bbox>…</bbox>`; coordinates normalised
to 0..1, (x1, y1) top-left. Model output can be truncated or malformed, so `parse` never raises:
it returns a best-effort result and says what it had to repair in `warnings`.

Invariants of every result: no tag is left in `text`; each object's `span` indexes `text` and
`text[span] == label`; every box lies in 0..1 with x1 <= x2 and y1 <= y2.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from varco.tasks.schemas import Box, OcrItem, ParsedObject, ParsedOutput, PixelBox
from varco.tasks.tag_patterns import TAG_BODIES, TAG_RE

__all__ = ["TAG_RE", "parse", "render_box", "render_object", "to_pixels"]

# What a tag cut off by max_new_tokens can look like at the very end of the output.
_PARTIAL_TAG_AT_END = re.compile(r"<\s*/?\s*[A-Za-z_|]*\s*$")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_BOX_SEPARATORS = re.compile(r"[\s,;()\[\]]+")


def render_coord(value: float) -> str:
    """Up to three decimals, as the model writes them: 0.51, 0.014, 1.0."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def render_box(box: Sequence[float]) -> str:
    return ", ".join(render_coord(v) for v in box)


def render_object(label: str, boxes: Iterable[Sequence[float]], tag: str = "obj") -> str:
    """`<obj>label</obj><bbox>b1<delim>b2</bbox>` (or `<char>` for OCR)."""
    return f"<{tag}>{label}</{tag}><bbox>{'<delim>'.join(render_box(b) for b in boxes)}</bbox>"


def to_pixels(box: Box, image_size: tuple[int, int]) -> PixelBox:
    """Normalised box -> pixel box in an image of (width, height), rounded half up."""
    w, h = image_size
    x1, y1, x2, y2 = box
    return (
        min(w, math.floor(x1 * w + 0.5)),
        min(h, math.floor(y1 * h + 0.5)),
        min(w, math.floor(x2 * w + 0.5)),
        min(h, math.floor(y2 * h + 0.5)),
    )


@dataclass
class _Phrase:
    kind: str  # "obj" or "char"
    start: int
    label: list[str] = field(default_factory=list)


@dataclass
class _Target:
    """A closed phrase waiting for its `<bbox>`; kind None is a bbox with no phrase before it."""

    kind: str | None
    label: str
    span: tuple[int, int]


@dataclass
class _Parser:
    warnings: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    pos: int = 0
    phrase: _Phrase | None = None
    pending: _Target | None = None
    bbox_target: _Target | None = None
    groups: list[str] | None = None  # coordinate groups of the open <bbox>, None when none is open
    objects: list[dict] = field(default_factory=list)
    ocr: list[tuple[str, Box]] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    # --- text -----------------------------------------------------------------------------
    def add_text(self, chunk: str) -> None:
        if not chunk:
            return
        if self.groups is not None:
            self.groups[-1] += chunk
            return
        if self.phrase is None and self.pending is not None and chunk.strip():
            self.flush_pending()
        self.parts.append(chunk)
        self.pos += len(chunk)
        if self.phrase is not None:
            self.phrase.label.append(chunk)

    # --- phrases --------------------------------------------------------------------------
    def open_phrase(self, kind: str) -> None:
        if self.phrase is not None:
            self.warn(f"<{kind}> inside an open <{self.phrase.kind}>: inner tag ignored")
            return
        self.flush_pending()
        self.phrase = _Phrase(kind, self.pos)

    def close_phrase(self, kind: str) -> None:
        if self.phrase is None:
            self.warn(f"</{kind}> without a matching <{kind}>: ignored")
            return
        if self.phrase.kind != kind:
            self.warn(f"<{self.phrase.kind}> closed by </{kind}>")
        self.pending = _Target(self.phrase.kind, "".join(self.phrase.label), (self.phrase.start, self.pos))
        self.phrase = None

    def flush_pending(self) -> None:
        """A closed phrase that got no `<bbox>`: keep the object, say that its box is missing."""
        target, self.pending = self.pending, None
        if target is None:
            return
        if target.kind == "obj":
            self.warn(f"<obj>{target.label}</obj> has no <bbox>")
            self.objects.append({"span": list(target.span), "boxes": []})
        else:
            self.warn(f"<char>{target.label}</char> has no <bbox>: not reported as an OCR item")

    # --- boxes ----------------------------------------------------------------------------
    def open_bbox(self) -> None:
        if self.groups is not None:
            self.warn("<bbox> inside an open <bbox>: ignored")
            return
        if self.phrase is not None:
            self.warn(f"<{self.phrase.kind}> not closed before <bbox>")
            self.close_phrase(self.phrase.kind)
        target, self.pending = self.pending, None
        if target is None:
            self.warn("<bbox> without a preceding <obj> or <char>: kept as an unlabelled object")
            target = _Target(None, "", (self.pos, self.pos))
        self.bbox_target = target
        self.groups = [""]

    def delim(self) -> None:
        if self.groups is None:
            self.warn("<delim> outside <bbox>: ignored")
            return
        self.groups.append("")

    def close_bbox(self, complete: bool = True) -> None:
        """Turn the open `<bbox>`'s groups into boxes; an incomplete bbox drops its last group."""
        groups, target = self.groups or [], self.bbox_target
        self.groups, self.bbox_target = None, None
        if not complete and groups:
            if groups[-1].strip():
                self.warn("output ends inside <bbox>: last, possibly cut, coordinates dropped")
            groups = groups[:-1]
        boxes = [b for b in (self.parse_box(g) for g in groups) if b is not None]
        if target is None:
            return
        if not boxes:
            self.warn(f"no valid box for {target.label!r}")
        if target.kind == "char":
            self.ocr.extend((target.label, b) for b in boxes)
        elif boxes or target.kind == "obj":
            self.objects.append({"span": list(target.span), "boxes": boxes})

    def parse_box(self, group: str) -> Box | None:
        if not group.strip():
            self.warn("empty box coordinates")
            return None
        numbers = _NUMBER.findall(group)
        if len(numbers) != 4:
            self.warn(f"box {group.strip()!r} does not hold four numbers: dropped")
            return None
        if _BOX_SEPARATORS.sub("", _NUMBER.sub("", group)):
            self.warn(f"box {group.strip()!r} holds stray characters")
        values = [float(n) for n in numbers]
        if not all(math.isfinite(v) for v in values):
            self.warn(f"box {group.strip()!r} is not finite: dropped")
            return None
        if any(v < 0.0 or v > 1.0 for v in values):
            self.warn(f"box {group.strip()!r} lies outside 0..1: clamped")
            values = [min(1.0, max(0.0, v)) for v in values]
        x1, y1, x2, y2 = values
        if x1 > x2 or y1 > y2:
            self.warn(f"box {group.strip()!r} has reversed corners: swapped")
            x1, x2 = min(x1, x2), max(x1, x2)
            y1, y2 = min(y1, y2), max(y1, y2)
        return (x1, y1, x2, y2)

    # --- end ------------------------------------------------------------------------------
    def finish(self) -> None:
        if self.groups is not None:
            self.close_bbox(complete=False)
        if self.phrase is not None:
            self.warn(f"output ends inside <{self.phrase.kind}>: phrase kept as text only")
            self.phrase = None
        if self.pending is not None:
            self.warn("output ends before a <bbox>")
            self.flush_pending()


def _strip_partial_tag(text: str) -> tuple[str, bool]:
    match = _PARTIAL_TAG_AT_END.search(text)
    if match is None:
        return text, False
    body = re.sub(r"[\s<]", "", match.group(0)).lower()
    if any(t.startswith(body) for t in TAG_BODIES):
        return text[: match.start()], True
    return text, False


def _remove_range(text: str, spans: list[list[int]], start: int, end: int) -> str:
    """Cut text[start:end] out and move every span so it still indexes the same characters."""

    def shift(i: int) -> int:
        return i if i <= start else start if i <= end else i - (end - start)

    for span in spans:
        span[0], span[1] = shift(span[0]), shift(span[1])
    return text[:start] + text[end:]


def parse(raw: str, image_size: tuple[int, int] | None = None) -> ParsedOutput:
    """Parse raw model output; never raises. `image_size=(width, height)` adds pixel boxes."""
    p = _Parser()
    source = raw.replace("\r\n", "\n").replace("\r", "\n")
    source, cut = _strip_partial_tag(source)
    if cut:
        p.warn("output ends inside a tag: partial tag dropped")

    last = 0
    for match in TAG_RE.finditer(source):
        p.add_text(source[last : match.start()])
        last = match.end()
        if match.group("control"):
            # EOS/padding at the very end is normal; anywhere else it is worth a warning.
            if TAG_RE.sub("", source[match.end() :]).strip():
                p.warn(f"control token {match.group('control')} inside the output: removed")
            continue
        name, closing = match.group("name").lower(), bool(match.group("close"))
        if name in ("gro", "ocr"):
            p.warn(f"task tag <{name}> echoed in the output: removed")
        elif name == "delim":
            p.delim()
        elif name == "bbox":
            p.close_bbox() if closing else p.open_bbox()
        elif p.groups is not None:
            p.warn(f"<{'/' if closing else ''}{name}> inside <bbox>: bbox closed there")
            p.close_bbox()
            p.close_phrase(name) if closing else p.open_phrase(name)
        else:
            p.close_phrase(name) if closing else p.open_phrase(name)
    p.add_text(source[last:])
    p.finish()

    text = "".join(p.parts)
    spans = [o["span"] for o in p.objects]
    # Removing tags can join fragments into a new tag ("<<obj>obj>"): remove until none is left.
    while (m := TAG_RE.search(text)) is not None:
        p.warn("tag formed by surrounding text: removed")
        text = _remove_range(text, spans, m.start(), m.end())
    lead = len(text) - len(text.lstrip())
    text = _remove_range(text, spans, 0, lead).rstrip()
    for span in spans:
        span[0], span[1] = min(span[0], len(text)), min(span[1], len(text))
        label = text[span[0] : span[1]]
        span[0] += len(label) - len(label.lstrip())
        span[1] -= len(label) - len(label.rstrip())
        span[1] = max(span[0], span[1])

    def px(box: Box) -> PixelBox | None:
        return to_pixels(box, image_size) if image_size else None

    objects = [
        ParsedObject(
            label=text[o["span"][0] : o["span"][1]],
            span=(o["span"][0], o["span"][1]),
            boxes=o["boxes"],
            boxes_px=[px(b) for b in o["boxes"]] if image_size else None,
        )
        for o in p.objects
    ]
    ocr = [OcrItem(text=t.strip(), box=b, box_px=px(b)) for t, b in p.ocr]
    return ParsedOutput(raw=raw, text=text, objects=objects, ocr=ocr, warnings=p.warnings)
