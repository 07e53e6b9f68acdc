"""Test images drawn with Pillow (the `worker` extra): kept apart from `helpers` so that the base install
can run the parser and request tests without Pillow."""

from __future__ import annotations

import io

from PIL import Image


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_rotated(width: int, height: int) -> bytes:
    """A JPEG stored width x height with EXIF orientation 6: it displays as height x width."""
    image = Image.new("RGB", (width, height), (10, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()
