"""Sample images the project draws itself with Pillow, with VARCO-style answers that fit them.

The demo and the tests need images and, for the random-weight tiny model, scripted answers whose
boxes really match what was drawn, so the parsed output can be checked against the picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from varco.tasks.prompts import TaskType
from varco.tasks.tags import render_object

Box = tuple[float, float, float, float]


@dataclass
class Sample:
    name: str
    image: Image.Image
    # Task -> the answer VARCO would give; used to script the tiny model.
    answers: dict[TaskType, str] = field(default_factory=dict)
    region: Box | None = None  # a region to ask about in a referring request
    label: str | None = None


def _norm(box_px: tuple[int, int, int, int], size: tuple[int, int]) -> Box:
    w, h = size
    x1, y1, x2, y2 = box_px
    return (round(x1 / w, 3), round(y1 / h, 3), round(x2 / w, 3), round(y2 / h, 3))


def shapes_scene() -> Sample:
    """Two circles on a pink blanket, 640x480: a stand-in for the card's two cats."""
    size = (640, 480)
    image = Image.new("RGB", size, (235, 235, 240))
    draw = ImageDraw.Draw(image)
    blanket, left, right = (2, 110, 638, 479), (20, 150, 300, 430), (330, 60, 620, 350)
    draw.rectangle(blanket, fill=(240, 170, 200))
    draw.ellipse(left, fill=(120, 90, 60))
    draw.ellipse(right, fill=(90, 90, 90))
    blanket_box, left_box, right_box = (_norm(x, size) for x in (blanket, left, right))
    grounding = (
        f"The image shows {render_object('two circles', [left_box, right_box])} lying on "
        f"{render_object('a pink blanket', [blanket_box])}. "
        "The circle on the left is brown and the one on the right is grey."
    )
    return Sample(
        name="shapes",
        image=image,
        answers={
            TaskType.CAPTION: "Two circles, one brown and one grey, lie on a pink blanket.",
            TaskType.GROUNDING: grounding,
            TaskType.REFERRING: "**This object** is a brown circle lying on the left of the blanket.",
            TaskType.VQA: f"There are two circles: {render_object('the brown circle', [left_box])} and "
            f"{render_object('the grey circle', [right_box])}.",
            TaskType.OCR: "",
        },
        region=left_box,
        label="this object",
    )


def street_sign() -> Sample:
    """A green street sign with two lines of text, 800x400: a stand-in for the card's OCR image."""
    size = (800, 400)
    image = Image.new("RGB", size, (30, 110, 60))
    draw = ImageDraw.Draw(image)
    lines = [("Baekbeom-ro", (120, 100)), ("124", (420, 100)), ("Incheon Grand Park", (120, 240))]
    ocr = []
    for text, (x, y) in lines:
        draw.text((x, y), text, fill="white", font_size=48)
        ocr.append(render_object(text, [_norm(draw.textbbox((x, y), text, font_size=48), size)], tag="char"))
    return Sample(
        name="sign",
        image=image,
        answers={
            TaskType.CAPTION: "A green street sign with white text.",
            TaskType.GROUNDING: f"The image shows {render_object('a green street sign', [(0.0, 0.0, 1.0, 1.0)])}.",
            TaskType.REFERRING: "**This object** is the word Baekbeom-ro on a street sign.",
            TaskType.VQA: "The sign points to Incheon Grand Park.",
            TaskType.OCR: "\n".join(ocr),
        },
        region=_norm((120, 100, 400, 160), size),
        label="this text",
    )


def tall_photo() -> Sample:
    """A tall 300x900 image with a red square, to batch odd aspect ratios with the others."""
    size = (300, 900)
    image = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(image)
    square = (60, 600, 240, 780)
    draw.rectangle(square, fill=(220, 30, 30))
    s = _norm(square, size)
    return Sample(
        name="tall",
        image=image,
        answers={
            TaskType.CAPTION: "A red square near the bottom of a white page.",
            TaskType.GROUNDING: f"The image shows {render_object('a red square', [s])} on a white background.",
            TaskType.REFERRING: "**This object** is a red square.",
            TaskType.VQA: "The square is red.",
            TaskType.OCR: "",
        },
        region=s,
        label="this object",
    )


def samples() -> list[Sample]:
    return [shapes_scene(), street_sign(), tall_photo()]
