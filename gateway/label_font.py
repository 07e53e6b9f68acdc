"""The font overlay labels are set in: Noto Sans KR, so Korean OCR text and labels render as Hangul.

It comes from the PyPI package `pylopdf-fonts-ko` (in the `gateway` extra): a data-only wheel of
9.6 MB carrying Noto Sans KR Regular (Hangul, Latin, KS X 1001 hanja) under the SIL Open Font
License 1.1, so `pip install 'varco-queue[gateway]'` brings it on any machine, with no system
font package and no download at run time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

try:  # at import, so a missing extra shows where overlays are imported, not mid-drawing
    import pylopdf_fonts_ko
except ImportError as exc:
    raise ImportError(f"overlays need the gateway extra: pip install 'varco-queue[gateway]' ({exc})") from None


def font_path() -> Path:
    return pylopdf_fonts_ko.sans_path()


@lru_cache(maxsize=32)
def label_font(size: int) -> ImageFont.FreeTypeFont:
    """The label font at `size` pixels (cached: loading the 4.6 MB face once per size is enough)."""
    return ImageFont.truetype(str(font_path()), size)
