"""Every Redis key is named in tasks/keys.py, and only there; docs/redis.md lists them all."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from varco.tasks import keys
from varco.tasks.job_ids import InvalidJobId

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "producer", "gateway", "workers")
NAMES = {name: value for name, value in vars(keys).items() if name.isupper() and isinstance(value, str)}
_KEY_LIKE = re.compile(r"^varco(:|\.callbacks)")  # a key, channel or queue name of ours


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants in code, docstrings and comments left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    strings = [node for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    return [(node.lineno, node.value) for node in strings if id(node) not in docstrings]


def test_no_module_but_keys_spells_a_key_prefix() -> None:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "tasks" / "keys.py":
                continue
            found += [f"{path.relative_to(ROOT)}:{line}: {text!r}" for line, text in _code_strings(path)
                      if _KEY_LIKE.match(text)]  # fmt: skip
    assert found == []


def test_the_checker_finds_a_hard_coded_prefix(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('"""`varco:job:{id}` in a docstring is fine."""\nKEY = "varco:cache:"\n')
    assert [text for _, text in _code_strings(module) if _KEY_LIKE.match(text)] == ["varco:cache:"]


def test_derived_keys() -> None:
    assert keys.job("abc") == "varco:job:abc"
    assert keys.idempotency("k-1") == "varco:idem:k-1"
    assert keys.result_cache("ff") == "varco:cache:ff"
    assert keys.webhook_delivered("msg.job.succeeded") == "varco:webhook-delivered:msg.job.succeeded"
    assert [keys.queue_lane("varco", step) for step in (0, 1, 9)] == ["varco", "varco:1", "varco:9"]
    with pytest.raises(InvalidJobId):
        keys.job("a:b")  # a malformed id never becomes a key


def test_docs_redis_lists_every_key() -> None:
    text = (ROOT / "docs" / "redis.md").read_text(encoding="utf-8")
    table = [line for line in text.splitlines() if line.startswith("| `")]
    missing = [name for name, value in NAMES.items()
               if not any(f"`{name}`" in row and f"`{value}" in row for row in table)]  # fmt: skip
    assert missing == []
