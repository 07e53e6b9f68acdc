"""Every gateway response a test here sees must be what /openapi.json says (tests/openapi_responses.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
import openapi_responses


@pytest.fixture(autouse=True)
def responses_match_the_openapi_document() -> Iterator[None]:
    with openapi_responses.recording() as seen:
        yield
    openapi_responses.check(seen)
