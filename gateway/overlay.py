"""PLACEHOLDER until h5's overlay module is merged: same signature, draws nothing.

The real module draws the job's parsed result on its image; this one returns a blank PNG of the
result's image size so the gateway's endpoint and tests run.
"""

from __future__ import annotations

import io

from PIL import Image

from varco.producer import Client


class OverlayUnavailable(ValueError):
    """No image is kept for the job (e.g. it ran before images were kept)."""


def overlay_png(client: Client, job_id: str) -> bytes:
    """PNG bytes of the job's image with its parsed result drawn on it, at the image's own size.
    Raises JobNotFound (unknown), JobFailed / JobCancelled (no result), OverlayUnavailable (no image)."""
    result = client.result(job_id, timeout=0)
    buffer = io.BytesIO()
    Image.new("RGB", (result.image.width, result.image.height), (255, 255, 255)).save(buffer, format="PNG")
    return buffer.getvalue()
