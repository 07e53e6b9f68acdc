"""The /openapi.json document through a real generator: openapi-typescript 7 with its defaults, then `tsc
--noEmit` on tests/ts/client.ts, a small openapi-fetch client that submits, polls, reads the result and
follows events. A document that says more or less than the server does (a field required that is optional,
a string that is an enum, a problem member it does not declare) stops the client compiling.

Node, npm and tests/ts/node_modules come from `make install` (`npm ci` in tests/ts).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from varco.gateway.app import create_app
from varco.tasks.settings import Settings

TS = Path(__file__).resolve().parents[1] / "ts"
BIN = TS / "node_modules" / ".bin"


def _run(*command: str | Path, cwd: Path) -> None:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.skipif(not (BIN / "tsc").exists(), reason="tests/ts/node_modules missing: run `make install`")
def test_a_client_generated_with_openapi_typescript_defaults_compiles(tmp_path: Path) -> None:
    document = TestClient(create_app(Settings(), ["alice-key-0123456789"])).get("/openapi.json").json()
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    for name in ("client.ts", "tsconfig.json"):
        shutil.copy(TS / name, tmp_path / name)
    (tmp_path / "node_modules").symlink_to(TS / "node_modules")

    _run(BIN / "openapi-typescript", "openapi.json", "-o", "api.d.ts", cwd=tmp_path)
    _run(BIN / "tsc", "--noEmit", "-p", ".", cwd=tmp_path)
