"""The model card's three example outputs parse exactly."""

from __future__ import annotations

from helpers import card_output

from varco.tasks.tags import parse


def test_grounding_example_with_delim() -> None:
    out = parse(card_output("grounding"), image_size=(640, 480))
    assert out.warnings == []
    assert out.text.startswith("The image shows two cats lying on a pink blanket. The cat on the left")
    assert "<" not in out.text
    assert [(o.label, o.span) for o in out.objects] == [
        ("two cats", (16, 24)),
        ("a pink blanket", (34, 48)),
        ("two remote controls", (281, 300)),
    ]
    for o in out.objects:
        assert out.text[o.span[0] : o.span[1]] == o.label
    assert out.objects[0].boxes == [(0.014, 0.106, 0.51, 0.996), (0.51, 0.054, 0.996, 0.787)]
    assert out.objects[0].boxes_px == [(9, 51, 326, 478), (326, 26, 637, 378)]
    assert out.objects[1].boxes == [(0.003, 0.231, 0.999, 0.999)]
    assert out.objects[2].boxes == [(0.037, 0.141, 0.283, 0.253), (0.506, 0.171, 0.581, 0.295)]
    assert out.ocr == []
    assert out.raw == card_output("grounding")


def test_ocr_example_sixteen_lines() -> None:
    out = parse(card_output("ocr"), image_size=(640, 480))
    assert out.warnings == []
    texts = [item.text for item in out.ocr]
    assert texts == [
        "백범로", "124번길", "Baekbeom-ro", "124", "만수주공아파트", "시흥", "시청", "Mansu",
        "Jugong", "Apt", "42", "Shieung", "인천대공원", "모래내시장역", "IncheonGrand", "Park",
    ]  # fmt: skip
    assert out.ocr[0].box == (0.172, 0.266, 0.328, 0.341)
    assert out.ocr[0].box_px == (110, 128, 210, 164)
    assert out.ocr[-1].box == (0.564, 0.681, 0.611, 0.723)
    assert out.text.split("\n") == texts
    assert out.objects == []


def test_referring_example_is_plain_korean_text() -> None:
    raw = card_output("referring")
    out = parse(raw)
    assert out.text == raw
    assert out.text.startswith("**이 물건**은 리모컨으로")
    assert out.objects == [] and out.ocr == [] and out.warnings == []


def test_output_object_matches_design_contract() -> None:
    dumped = parse(card_output("grounding"), image_size=(640, 480)).model_dump(mode="json")
    assert set(dumped) == {"raw", "text", "objects", "ocr", "warnings"}
    assert dumped["objects"][0] == {
        "label": "two cats",
        "span": [16, 24],
        "boxes": [[0.014, 0.106, 0.51, 0.996], [0.51, 0.054, 0.996, 0.787]],
        "boxes_px": [[9, 51, 326, 478], [326, 26, 637, 378]],
    }
    ocr = parse(card_output("ocr"), image_size=(640, 480)).model_dump(mode="json")["ocr"][0]
    assert ocr == {"text": "백범로", "box": [0.172, 0.266, 0.328, 0.341], "box_px": [110, 128, 210, 164]}


def test_without_image_size_no_pixel_boxes() -> None:
    out = parse(card_output("grounding"))
    assert all(o.boxes_px is None for o in out.objects)
