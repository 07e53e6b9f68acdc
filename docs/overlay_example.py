"""Regenerate docs/overlay-grounding.png: the model card's grounding answer drawn on a drawn scene.

Run: .venv/bin/python docs/overlay_example.py
The scene is painted where the card's boxes are (two cats on a pink blanket, two remote controls), so the
overlay can be checked by eye; the boxes and labels come from `draw_overlay`, as `varco overlay` draws them.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from varco.gateway.overlay import draw_overlay
from varco.tasks.schemas import ImageInfo, JobResult, JobState
from varco.tasks.tags import parse, to_pixels

HERE = Path(__file__).resolve().parent
CARD = HERE.parents[1] / "shared" / "fixtures" / "card_grounding_output.txt"
SIZE = (640, 480)


def scene(boxes: dict[str, list[tuple[int, int, int, int]]]) -> Image.Image:
    image = Image.new("RGB", SIZE, (236, 228, 214))
    draw = ImageDraw.Draw(image)
    for x1, y1, x2, y2 in boxes["a pink blanket"]:
        draw.rounded_rectangle((x1, y1, x2, y2), radius=24, fill=(238, 170, 190))
    for (x1, y1, x2, y2), fur in zip(boxes["two cats"], [(150, 120, 95), (90, 88, 92)], strict=True):
        draw.ellipse((x1 + 10, y1 + 60, x2 - 10, y2 - 10), fill=fur)  # body
        head = (x1 + 20, y1 + 10, x1 + 140, y1 + 120)
        draw.ellipse(head, fill=fur)
        draw.polygon([(x1 + 28, y1 + 40), (x1 + 40, y1), (x1 + 70, y1 + 25)], fill=fur)  # ears
        draw.polygon([(x1 + 90, y1 + 25), (x1 + 120, y1), (x1 + 132, y1 + 40)], fill=fur)
    for x1, y1, x2, y2 in boxes["two remote controls"]:
        draw.rounded_rectangle((x1, y1, x2, y2), radius=6, fill=(40, 40, 46))
        for row in range(y1 + 8, y2 - 6, 12):
            draw.ellipse((x1 + 8, row, x1 + 16, row + 6), fill=(200, 60, 60))
    return image


def main() -> None:
    raw = CARD.read_text(encoding="utf-8").removesuffix("\n")
    output = parse(raw, SIZE)
    boxes = {obj.label: [to_pixels(b, SIZE) for b in obj.boxes] for obj in output.objects}
    result = JobResult(
        job_id="example", task="grounding", state=JobState.SUCCEEDED, model="NCSOFT/VARCO-VISION-14B-HF",
        prompt="<gro>\nDescribe the image in detail.", image=ImageInfo(uri="-", width=640, height=480, sha256="-"),
        output=output,
    )  # fmt: skip
    out = HERE / "overlay-grounding.png"
    draw_overlay(scene(boxes), result).quantize(colors=64).save(out, optimize=True)
    print(out, out.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
