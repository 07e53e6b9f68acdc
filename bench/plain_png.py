"""One flat-coloured PNG, the image the queue benches send when its content does not matter."""

from __future__ import annotations

import io

from PIL import Image


def plain_png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 60, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
