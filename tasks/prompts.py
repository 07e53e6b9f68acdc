"""Task types and the user text each one sends to the model (DESIGN.md's task table)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum

from varco.tasks.tags import render_box

# The model's tag vocabulary (special tokens of VARCO's tokenizer).
VARCO_TAGS = ("<gro>", "<ocr>", "<char>", "</char>", "<obj>", "</obj>", "<bbox>", "</bbox>", "<delim>")
# Chat-structure tokens: a user must never be able to write these into the conversation.
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<video>")
# Any `<|…|>` token is a control token in Qwen's vocabulary, plus the media placeholders; matched
# case-insensitively and with inner spaces, since tokenizers differ in how they normalise.
_CONTROL_RE = re.compile(r"<\s*\|[^<>]*\|\s*>|<\s*/?\s*(?:image|video)\s*>", re.IGNORECASE)
_TAG_RE = re.compile(r"<\s*/?\s*(?:obj|char|bbox|delim|gro|ocr)\s*>", re.IGNORECASE)


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
    match = _CONTROL_RE.search(text)
    return match.group(0) if match else None


def find_varco_tag(text: str) -> str | None:
    match = _TAG_RE.search(text)
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
