"""Overlays drawn by varco.gateway.overlay: boxes where the result says, labels legible, Hangul as Hangul."""

from __future__ import annotations

import io

import pytest
from helpers import card_output
from PIL import Image, ImageChops, UnidentifiedImageError

from varco.gateway.label_font import label_font
from varco.gateway.overlay import colour_for, contrast_ratio, draw_overlay, open_kept_image, text_colour_on
from varco.tasks.schemas import ImageInfo, JobResult, OcrItem, ParsedObject, ParsedOutput
from varco.tasks.tags import parse, to_pixels

GREY = (128, 128, 128)
W, H = 400, 300


def result(task: str, output: ParsedOutput, **fields) -> JobResult:
    return JobResult(
        job_id="j", task=task, state="succeeded", model="m", prompt=fields.pop("prompt", ""),
        image=ImageInfo(uri="u", width=W, height=H, sha256="s"), output=output, **fields,
    )  # fmt: skip


def edges(box, size=(W, H)):
    """(left-edge midpoint, just outside it, the box's centre) in pixels."""
    x1, y1, x2, y2 = to_pixels(box, size)
    mid = (y1 + y2) // 2
    return (x1, mid), (x1 - 1, mid), ((x1 + x2) // 2, mid)


def test_grounding_draws_every_box_in_its_objects_colour_and_leaves_the_rest() -> None:
    boxes = {"cat": [(0.1, 0.4, 0.3, 0.9), (0.35, 0.4, 0.45, 0.9)], "dog": [(0.6, 0.4, 0.9, 0.9)]}
    objects = [ParsedObject(label=k, span=(0, 0), boxes=v) for k, v in boxes.items()]
    image = Image.new("RGB", (W, H), GREY)
    out = draw_overlay(image, result("grounding", ParsedOutput(raw="", text="", objects=objects)))
    assert out.size == (W, H) and image.getpixel((0, 0)) == GREY  # the input is left as it was
    assert colour_for(0) != colour_for(1)
    for index, box in enumerate([*boxes["cat"], *boxes["dog"]]):
        colour = colour_for(0 if index < 2 else 1)
        edge, outside, centre = edges(box)
        assert out.getpixel(edge) == colour, box
        assert out.getpixel(outside) == text_colour_on(colour), box  # the halo
        assert out.getpixel(centre) == GREY, box
        x1, y1, *_ = to_pixels(box, (W, H))
        assert out.getpixel((x1 + 2, y1 - 3)) == colour  # the label's filled box, above the box
    assert out.getpixel((5, 5)) == GREY and out.getpixel((W - 5, 60)) == GREY


def test_the_card_grounding_example_draws_each_object_box() -> None:
    parsed = parse(card_output("grounding"), (640, 480))
    out = draw_overlay(Image.new("RGB", (640, 480), GREY), result("grounding", parsed))
    # The right-hand remote control: its box's bottom edge is clear of the others.
    x1, _, x2, y2 = parsed.objects[2].boxes_px[1]
    assert out.getpixel(((x1 + x2) // 2, y2)) == colour_for(2)


def test_colours_are_distinct_and_every_label_is_legible() -> None:
    colours = [colour_for(i) for i in range(60)]
    assert len(set(colours)) == len(colours)
    for colour in colours:
        assert contrast_ratio(text_colour_on(colour), colour) >= 4.5, colour  # WCAG AA for text


def test_hangul_draws_real_glyphs_not_missing_glyph_boxes() -> None:
    font = label_font(32)

    def bitmap(char: str) -> bytes:
        mask = font.getmask(char)
        return bytes(mask.size) + bytes(mask)

    notdef = bitmap("\ue000")
    assert bitmap("\ue001") == notdef  # two unmapped private-use code points: both draw .notdef
    glyphs = {char: bitmap(char) for char in "가나한글백범로"}
    assert len(set(glyphs.values())) == len(glyphs), "distinct Hangul drew identical bitmaps"
    for char, glyph in glyphs.items():
        assert glyph != notdef, f"{char} drew the missing-glyph box"
        assert any(font.getmask(char)), f"{char} drew nothing"


def test_ocr_labels_carry_their_korean_text() -> None:
    box = (0.2, 0.4, 0.6, 0.6)

    def drawn(text: str) -> Image.Image:
        output = ParsedOutput(raw="", text="", ocr=[OcrItem(text=text, box=box)])
        return draw_overlay(Image.new("RGB", (W, H), GREY), result("ocr", output))

    hangul, missing, other = drawn("백범로"), drawn("\ue000\ue001\ue002"), drawn("시흥역")
    edge, _, centre = edges(box)
    assert hangul.getpixel(edge) == colour_for(0) and hangul.getpixel(centre) == GREY
    x1, y1, _, _ = to_pixels(box, (W, H))
    label = (x1, 0, W, y1)  # the label sits above the box
    assert ImageChops.difference(hangul.crop(label), missing.crop(label)).getbbox() is not None
    assert ImageChops.difference(hangul.crop(label), other.crop(label)).getbbox() is not None
    ink = text_colour_on(colour_for(0))
    assert ink in {colour for _, colour in hangul.crop(label).getcolors(W * H)}  # text drawn in the label


def test_referring_draws_the_asked_region_from_the_result_or_its_prompt() -> None:
    region = (0.039, 0.138, 0.283, 0.457)
    text = card_output("referring")
    output = ParsedOutput(raw=text, text=text)
    prompt = "<obj>이 물건</obj><bbox>0.039, 0.138, 0.283, 0.457</bbox>은 어떻게 쓰는거야?"
    new = draw_overlay(Image.new("RGB", (W, H), GREY), result("referring", output, region=region, label="이 물건"))
    old = draw_overlay(Image.new("RGB", (W, H), GREY), result("referring", output, prompt=prompt))  # no region field
    edge, outside, centre = edges(region)
    for out in (new, old):
        assert out.getpixel(edge) == colour_for(0) and out.getpixel(centre) == GREY
        assert out.getpixel(outside) == text_colour_on(colour_for(0))
    assert ImageChops.difference(new, old).getbbox() is None  # the same region and label either way


def test_a_kept_image_opens_only_in_the_served_formats() -> None:
    def encoded(format: str) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 6), GREY).save(buffer, format=format)
        return buffer.getvalue()

    assert open_kept_image(encoded("WEBP")).size == (8, 6)
    with pytest.raises(UnidentifiedImageError):  # overlay_png answers it as OverlayUnavailable
        open_kept_image(encoded("PPM"))
