"""Text deltas of a streamed request, from its generated ids as they grow (both backends, engine thread).

Each update decodes the ids so far the way the output step does (`decode.to_output`: cut at the first stop
token, tags kept, stripped) and hands on what the text gained since the last update. A trailing U+FFFD
(a multi-byte character whose bytes are not all generated yet) and trailing whitespace (which the final
text strips) wait for the next update, so the deltas joined are exactly the final answer's text. An update
that does not extend what was sent (a batch rerun one by one after a failure) sends nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any

log = logging.getLogger(__name__)

OnDelta = Callable[[str], None]
"""Called in the engine thread with each piece of new text; must be quick and must not block on I/O."""


def extension(sent: str, text: str) -> str:
    """What `text` adds to `sent`; nothing when it does not extend it (a rerun that wrote otherwise)."""
    return text[len(sent) :] if len(text) > len(sent) and text.startswith(sent) else ""


class DeltaDecoder:
    def __init__(self, on_delta: OnDelta, tokenizer: Any, stop_ids: Collection[int], budget: int) -> None:
        self.on_delta, self.tokenizer, self.stop_ids, self.budget = on_delta, tokenizer, stop_ids, budget
        self.sent = ""

    def update(self, token_ids: Sequence[int]) -> None:
        """All ids generated so far for this request (prompt excluded; stop or padding ids may follow)."""
        ids = list(token_ids[: self.budget])
        end = next((i for i, token in enumerate(ids) if token in self.stop_ids), len(ids))
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=False).strip().rstrip("\ufffd").rstrip()
        if not (delta := extension(self.sent, text)):
            return
        self.sent = text
        try:
            self.on_delta(delta)
        except Exception:  # a publisher's failure never reaches the device's thread
            log.exception("a delta listener failed; its deltas are dropped")
