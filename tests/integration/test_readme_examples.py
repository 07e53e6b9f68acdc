"""Every README code block marked `<!-- readme-example: python -->` or `<!-- readme-example: bash -->` runs,
as a user would run it, against a real Redis, a CPU worker (scripted engine) and a gateway.

The blocks see the worker's settings (VARCO_BROKER_URL, VARCO_FILE_ROOT holding cat.png…), `VARCO_KEY` (a
gateway key), and the gateway's address in place of `http://localhost:8000`. Mark another block the same
way to have it run here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GATEWAY_KEYS

README = Path(__file__).resolve().parents[2] / "README.md"
MARKED = re.compile(r"<!-- readme-example: (python|bash) -->\n```\w*\n(.*?)\n```", re.DOTALL)


def examples(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in MARKED.finditer(text)]


def test_the_marker_finds_blocks_and_only_marked_ones() -> None:
    text = "<!-- readme-example: python -->\n```python\nprint(1)\n```\n\n```bash\nexit 1\n```\n"
    assert examples(text) == [("python", "print(1)")]
    found = examples(README.read_text(encoding="utf-8"))
    assert {"python", "bash"} <= {language for language, _ in found}


@pytest.mark.parametrize(
    ("language", "code"), examples(README.read_text(encoding="utf-8")), ids=lambda v: v if len(v) < 8 else ""
)
def test_a_readme_example_runs(
    language: str, code: str, gateway: str, gateway_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**gateway_env, "VARCO_KEY": GATEWAY_KEYS[0], "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    code = code.replace("http://localhost:8000", gateway)
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-eo", "pipefail", "-c", code]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout, done.stdout[-3000:]  # the example's job finished, and said so
