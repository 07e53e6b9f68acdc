from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from varco.workers.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-varco")


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path):
    from varco.workers.engine import Engine

    return Engine(str(tiny_model_dir)).load()
