"""Decode a fetched image no larger than the model will use, holding few full-size decodes at once.

An 8000x8000 PNG of zeros is 187 KB and 192 MB decoded; a worker's task threads (16 for hf, more for
vLLM) each held one until the processor shrank it, so six such jobs peaked at 5.65 GB. Here:
- JPEG decodes at a reduced scale (`Image.draft`: the DCT scales by 1/2, 1/4 or 1/8), never below
  what the processor uses;
- any image with a side over `max_side` (the largest anyres grid the model's processor tiles to:
  2304 for VARCO-VISION) is shrunk to fit it before it leaves here (`Image.thumbnail`, which reduces
  by whole factors first), so a task thread holds at most max_side² pixels: the processor would have
  shrunk it to that anyway;
- the full-size decode of any format is charged to a `PixelBudget` for as long as it lives, so a
  worker holds at most the budget's pixels of full-size images at once, whatever the number of jobs.

The caller keeps the original (EXIF-oriented) width and height: boxes in pixels are in those.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

# The largest side VARCO-VISION-14B's processor tiles to (anyres_max_9: grids up to 6x6 of 384 px), for a
# model whose processor config cannot be read.
DEFAULT_MAX_SIDE = 2304
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the image a quarter
# A decode this large is handed back to the OS once freed (see `give_back_freed_memory`).
TRIM_AFTER_PIXELS = 4_000_000


def _libc_malloc_trim() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_malloc_trim = _libc_malloc_trim()


def give_back_freed_memory() -> None:
    """glibc keeps what a thread freed in that thread's malloc arena: six task threads that each decoded one
    64 Mpx image in turn held six of them (1.2 GB measured, never returned). `malloc_trim` returns the free
    pages of every arena to the OS."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class PixelBudget:
    """A counting semaphore on decoded pixels: `hold(n)` waits until n more pixels fit under `pixels`.
    One image larger than the whole budget is charged the whole budget (it runs alone)."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self.in_use = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.pixels)
        with self._cond:
            self._cond.wait_for(lambda: self.in_use + pixels <= self.pixels)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= pixels
                self._cond.notify_all()


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, no side over max_side
    width: int  # the original's, after EXIF orientation
    height: int


def decode_bounded(opened: Image.Image, *, max_side: int, budget: PixelBudget) -> DecodedImage:
    """Decode `opened` (size already checked against the pixel limit), shrunk to fit max_side x max_side."""
    width, height = opened.size
    box = (max_side, max_side)
    if max(opened.size) > max_side:
        opened.draft("RGB", box)  # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8, still >= box
    with budget.hold(opened.width * opened.height):  # the size it will decode at
        opened.load()
        # Read after load, inside the budget: a PNG's getexif() decodes the whole image to find its eXIf chunk.
        if opened.getexif().get(0x0112, 1) in _SWAPS_SIDES:
            width, height = height, width
        shrunk = opened
        if max(shrunk.size) > max_side:
            if shrunk.mode not in ("RGB", "RGBA", "L", "LA"):  # a palette would be shrunk by nearest neighbour
                shrunk = shrunk.convert("RGB")
            shrunk.thumbnail(box, Image.Resampling.BICUBIC)
        image = ImageOps.exif_transpose(shrunk).convert("RGB")  # always a new image
        del shrunk
        opened.close()  # its pixels are freed here, inside the budget, not when the caller is done with it
    if width * height > TRIM_AFTER_PIXELS:
        give_back_freed_memory()
    return DecodedImage(image, width, height)


def processor_max_side(model: str) -> int | None:
    """The largest side the model's image processor resizes to (its largest anyres grid), read from a
    local model directory's processor config; None when there is none to read (a hub id not downloaded)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(model) / name
        if not path.is_file():
            cached = _hub_cached(model, name)
            path = Path(cached) if cached else path
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        config = config.get("image_processor", config)
        pinpoints = config.get("image_grid_pinpoints")
        if pinpoints:
            return max(max(int(side) for side in pair) for pair in pinpoints)
    return None


def _hub_cached(model: str, name: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, name)
    except Exception:  # not a hub id, or no hub client: the default side
        return None
    return found if isinstance(found, str) else None


def worker_max_side(model: str) -> int:
    """What a worker for `model` shrinks images to: its processor's largest side, else VARCO-VISION's."""
    return processor_max_side(model) or DEFAULT_MAX_SIDE
