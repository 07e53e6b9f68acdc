"""Overlays: a job's image with its parsed result drawn on it, at the image's own size (Pillow only).

Grounding (and any other output with objects): every box, labelled with its phrase; OCR: every box,
labelled with its text; referring: the asked region, labelled with its label. Each object has its own
colour; every outline has a contrasting halo and every label a filled box with black or white text,
whichever contrasts more, so both stay legible on any background. Labels use Noto Sans KR
(`label_font`), so Korean renders as Hangul.

The image is the one the worker kept when the job ran (`{job_id}.image`, VARCO_KEEP_IMAGES), not
fetched again: presigned URLs expire, the gateway holds none of the worker's fetch credentials or
SSRF exposure, and the overlay shows exactly the bytes the model saw, decoded the same way.
"""

from __future__ import annotations

import colorsys
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from varco.gateway.label_font import label_font
from varco.producer.client import Client
from varco.tasks.prompts import DEFAULT_REFERRING_LABEL
from varco.tasks.requests import IMAGE_FORMATS
from varco.tasks.schemas import Box, JobResult
from varco.tasks.tags import parse, to_pixels

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]
# Distinct, saturated first colours (Tableau 10 without its greys); later objects continue on
# golden-angle hues, so any number of objects stays tellable apart.
PALETTE: tuple[RGB, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 221, 0),
)  # fmt: skip
MAX_LABEL_CHARS = 48


class OverlayUnavailable(ValueError):
    """No overlay can be drawn for this job: no image was kept for it (or it can no longer be read)."""


class OverlayNotReady(OverlayUnavailable):
    """The job has not finished yet, so there is no result to draw."""


@dataclass(frozen=True)
class Mark:
    """One box to draw: where (normalised), what to write beside it, and in which colour."""

    box: Box
    text: str
    colour: RGB


def colour_for(index: int) -> RGB:
    if index < len(PALETTE):
        return PALETTE[index]
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def _luminance(colour: RGB) -> float:
    """WCAG relative luminance."""

    def channel(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: RGB, b: RGB) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_colour_on(fill: RGB) -> RGB:
    """Black or white, whichever contrasts more with `fill` (at least 4.58:1 for any fill)."""
    black, white = (0, 0, 0), (255, 255, 255)
    return black if contrast_ratio(fill, black) >= contrast_ratio(fill, white) else white


def _asked(result: JobResult) -> tuple[Box, str] | None:
    """A referring job's asked region and label: from the result, or (older results) parsed from its prompt."""
    if result.region is not None:
        return result.region, result.label or DEFAULT_REFERRING_LABEL
    objects = parse(result.prompt).objects
    return (objects[0].boxes[0], objects[0].label) if objects and objects[0].boxes else None


def marks_for(result: JobResult) -> Iterator[Mark]:
    """What to draw for a result: the referring region first, then objects, then OCR items."""
    index = 0
    if result.task == "referring" and (asked := _asked(result)) is not None:
        yield Mark(*asked, colour_for(index))
        index += 1
    for obj in result.output.objects:
        for box in obj.boxes:
            yield Mark(box, obj.label, colour_for(index))
        index += 1
    for item in result.output.ocr:
        yield Mark(item.box, item.text, colour_for(index))
        index += 1


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "…"


def draw_overlay(image: Image.Image, result: JobResult, *, copy: bool = True) -> Image.Image:
    """A copy of `image` (RGB, same size) with the result's boxes and labels drawn on it; with
    `copy=False`, `image` itself (RGB) drawn on: one full-size image less in memory."""
    canvas = image.convert("RGB") if copy or image.mode != "RGB" else image
    width, height = canvas.size
    side = min(width, height)
    line = max(2, round(side / 160))
    font = label_font(max(12, round(side / 28)))
    pad = max(2, font.size // 6)
    draw = ImageDraw.Draw(canvas)
    marks = list(marks_for(result))
    placed = []
    for mark in marks:  # every box before any label, so no outline crosses a label
        x1, y1, x2, y2 = to_pixels(mark.box, (width, height))
        x2, y2 = max(x1, min(x2, width - 1)), max(y1, min(y2, height - 1))
        halo = text_colour_on(mark.colour)
        draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=halo, width=line + 2)
        draw.rectangle((x1, y1, x2, y2), outline=mark.colour, width=line)
        placed.append((mark, x1, y1))
    for mark, x1, y1 in placed:
        text = _short(mark.text)
        if not text:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
        # Above the box when there is room, else inside its top edge; always within the image.
        lx = max(0, min(x1, width - box_w))
        ly = y1 - box_h if y1 - box_h >= 0 else max(0, min(y1, height - box_h))
        draw.rectangle((lx, ly, lx + box_w - 1, ly + box_h - 1), fill=mark.colour)
        draw.text((lx + pad - left, ly + pad - top), text, font=font, fill=text_colour_on(mark.colour))
    return canvas


def open_kept_image(data: bytes) -> Image.Image:
    """Decode kept image bytes as the worker did: EXIF orientation applied, RGB. No copy more than
    needed: at the pixel limit each is ~200 MB."""
    opened = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    opened.load()
    ImageOps.exif_transpose(opened, in_place=True)
    return opened if opened.mode == "RGB" else opened.convert("RGB")


def kept_image(client: Client, job_id: str) -> tuple[JobResult, bytes, str]:
    """The job's result, the image bytes its worker kept, and their media type (`image/png`…).

    Raises JobNotFound (unknown), JobFailed / JobCancelled (no result), OverlayNotReady (not finished
    yet; an OverlayUnavailable) and OverlayUnavailable (no image is kept for this job, or it is unreadable).
    """
    try:
        result = client.result(job_id, timeout=0)  # reads the record once: never waits
    except TimeoutError:
        raise OverlayNotReady(f"job {job_id} has not finished: it is {client.status(job_id).state.value}") from None
    if result.image.kept_uri is None:
        raise OverlayUnavailable(f"no image was kept for job {job_id} (its worker ran with VARCO_KEEP_IMAGES=false)")
    try:
        data = client.store.read(result.image.kept_uri)
        with Image.open(io.BytesIO(data)) as opened:
            media_type = opened.get_format_mimetype() or "application/octet-stream"
    except (UnidentifiedImageError, OSError, ValueError, ClientError, BotoCoreError) as exc:
        # Deleted or expired (a file store's FileNotFoundError, S3's NoSuchKey), or not an image.
        raise OverlayUnavailable(f"the image kept for job {job_id} cannot be read: {exc}") from None
    return result, data, media_type


def stored_overlay(client: Client, job_id: str) -> bytes | None:
    """The overlay drawn for this job before, kept beside its result; None when there is none yet."""
    try:
        return client.store.read(client.store.overlay_uri(job_id))
    except (OSError, ClientError, BotoCoreError):
        return None


def overlay_png(client: Client, job_id: str) -> bytes:
    """PNG bytes of the job's image with its parsed result drawn on it, at the image's own size; raises
    as `kept_image` does. Drawn once: kept in the store beside the result (a finished job's result never
    changes), and read from there by every later request."""
    if (stored := stored_overlay(client, job_id)) is not None:  # drawn while this request waited its turn
        return stored
    result, data, _ = kept_image(client, job_id)
    try:
        image = open_kept_image(data)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise OverlayUnavailable(f"the image kept for job {job_id} cannot be read: {exc}") from None
    buffer = io.BytesIO()
    draw_overlay(image, result, copy=False).save(buffer, format="PNG", optimize=True)
    del image
    png = buffer.getvalue()
    try:
        client.store.write_overlay(job_id, png)
    except (OSError, ClientError, BotoCoreError):  # not kept: drawn again next time, still answered now
        log.warning("could not keep the overlay of job %s in the result store", job_id, exc_info=True)
    return png
