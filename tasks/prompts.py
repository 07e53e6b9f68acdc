"""Task types and the user text each one sends to the model (DESIGN.md's task table)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from varco.tasks.tag_patterns import CONTROL_TOKEN_RE, CONTROL_TOKENS, VARCO_TAG_RE, VARCO_TAGS
from varco.tasks.tags import render_box

# The tag vocabulary lives in tag_patterns; its names stay importable from here.
__all__ = [
    "CONTROL_TOKENS",
    "DEFAULT_CAPTION_PROMPT",
    "DEFAULT_GROUNDING_PROMPT",
    "DEFAULT_REFERRING_LABEL",
    "VARCO_TAGS",
    "TaskType",
    "build_prompt",
    "find_control_token",
    "find_varco_tag",
]


class TaskType(StrEnum):
    CAPTION = "caption"
    GROUNDING = "grounding"
    REFERRING = "referring"
    OCR = "ocr"
    VQA = "vqa"


DEFAULT_CAPTION_PROMPT = "Describe this image."
DEFAULT_GROUNDING_PROMPT = "Describe the image in detail."
DEFAULT_REFERRING_LABEL = "this object"


def find_control_token(text: str) -> str | None:
    match = CONTROL_TOKEN_RE.search(text)
    return match.group(0) if match else None


def find_varco_tag(text: str) -> str | None:
    match = VARCO_TAG_RE.search(text)
    return match.group(0) if match else None


def build_prompt(
    task: TaskType,
    prompt: str | None = None,
    region: Sequence[float] | None = None,
    label: str | None = None,
) -> str:
    """The user text for a task; the chat template adds the image. Inputs are validated upstream."""
    if task is TaskType.CAPTION:
        return prompt or DEFAULT_CAPTION_PROMPT
    if task is TaskType.GROUNDING:
        return "<gro>\n" + (prompt or DEFAULT_GROUNDING_PROMPT)
    if task is TaskType.REFERRING:
        if region is None:
            raise ValueError("referring needs a region")
        return f"<obj>{label or DEFAULT_REFERRING_LABEL}</obj><bbox>{render_box(region)}</bbox>{prompt or ''}"
    if task is TaskType.OCR:
        return "<ocr>"
    if not prompt:
        raise ValueError("vqa needs a prompt")
    return prompt
