"""How long the fuzz tests run: a few hundred examples in the unit suite, VARCO_FUZZ_EXAMPLES under
`make fuzz` (bench/RESULTS.md has the long runs). No hypothesis database: what a run finds that matters
is kept as a file under tests/fuzz/corpus/, read back by every run."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings

CORPUS = Path(__file__).parent / "corpus"
EXAMPLES = int(os.environ.get("VARCO_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def corpus(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).iterdir())
