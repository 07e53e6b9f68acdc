"""VARCO-VISION's tag vocabulary and the one set of patterns that find it, in user text and in model output.

`prompts.py` refuses a prompt or label that holds a control token (or, for a label, a VARCO tag);
`tags.py` parses the same patterns out of the model's answer; the engines stop on `STOP_TOKENS`.
One set, so a spelling refused in a request is also one the parser strips from an answer.
"""

from __future__ import annotations

import re

# The model's own tags (special tokens of VARCO's tokenizer), by name and as written.
TAG_NAMES = ("obj", "char", "bbox", "delim", "gro", "ocr")
VARCO_TAGS = ("<gro>", "<ocr>", "<char>", "</char>", "<obj>", "</obj>", "<bbox>", "</bbox>", "<delim>")
# Chat-structure tokens: a user must never be able to write these into the conversation.
END_OF_TURN, END_OF_TEXT = "<|im_end|>", "<|endoftext|>"
CONTROL_TOKENS = ("<|im_start|>", END_OF_TURN, END_OF_TEXT, "<image>", "<video>")
# Where an answer ends: the end of the assistant's turn, or the end of the text (Qwen's EOS and pad).
STOP_TOKENS = (END_OF_TURN, END_OF_TEXT)

# Tolerant of case and inner spacing (`< /obj >`), since tokenizers differ in how they normalise, so
# no spelling of a tag survives into parsed text or slips through the prompt check.
VARCO_TAG = rf"<\s*(?P<close>/?)\s*(?P<name>{'|'.join(TAG_NAMES)})\s*>"
# Any `<|…|>` token is a control token in Qwen's vocabulary, plus the media placeholders.
CONTROL_TOKEN = r"(?P<control><\s*\|[^<>]*\|\s*>|<\s*/?\s*(?:image|video)\s*>)"

VARCO_TAG_RE = re.compile(VARCO_TAG, re.IGNORECASE)
CONTROL_TOKEN_RE = re.compile(CONTROL_TOKEN, re.IGNORECASE)
# Either kind: what the parser removes from an answer's text.
TAG_RE = re.compile(f"{VARCO_TAG}|{CONTROL_TOKEN}", re.IGNORECASE)

# What a tag cut off by max_new_tokens can be the start of (without its `<` and `>`).
TAG_BODIES = (*(t for n in TAG_NAMES for t in (n, "/" + n)), *(t.strip("<>") for t in CONTROL_TOKENS))
