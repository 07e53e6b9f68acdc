from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def card_output(name: str) -> str:
    """A model-card example output; the fixture's final newline is not part of it (fixtures/README)."""
    text = (FIXTURES / f"card_{name}_output.txt").read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from workers.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-varco")


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path):
    from workers.engine import Engine

    return Engine(str(tiny_model_dir)).load()
