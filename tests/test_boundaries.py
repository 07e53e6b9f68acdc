"""Import rules: the producer side and the gateway never pull torch or workers in, and each room of
workers/ imports only what its place on a job's path allows."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


def test_producer_and_tasks_never_import_torch_or_workers() -> None:
    code = (
        "import sys, varco.tasks.tags, varco.tasks.requests, varco.tasks.settings, varco.tasks.schemas, "
        "varco.producer, varco.producer.cli; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'PIL') "
        "or m.startswith('varco.workers')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_overlays_never_import_torch_or_workers() -> None:
    code = (
        "import sys, varco.gateway.overlay; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
        "or m.startswith('varco.workers')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_never_imports_torch_or_workers() -> None:
    code = (
        "import sys, varco.gateway.server, varco.gateway.app; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
        "or m.startswith('varco.workers')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# The rooms of workers/ (see docs/architecture.md): a job goes input -> engines -> output, and runtime/
# wires them together. A room may import the contracts (tasks/), the network layer (net/), the
# cross-cutting logs and metrics, and its own modules; node/ starts the runtime only by its module path.
ROOT = Path(__file__).resolve().parents[1]
SHARED = ("varco.tasks", "varco.workers.net", "varco.workers.logs", "varco.workers.metrics")
ALLOWED: dict[str, tuple[str, ...]] = {
    "net": ("varco.tasks",),
    "input": SHARED,
    "engines": SHARED,
    "output": SHARED,
    "node": (*SHARED, "varco.workers.node"),
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every `varco` module a file imports, at any depth (function-level imports too), with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from varco.workers import metrics` imports varco.workers.metrics
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("varco.")]


def forbidden_imports(room: str, root: Path = ROOT) -> list[str]:
    own = f"varco.workers.{room}"
    allowed = (*ALLOWED[room], own)
    bad = []
    for path in sorted((root / "workers" / room).rglob("*.py")):
        for line, name in imports_of(path):
            if not any(name == ok or name.startswith(ok + ".") for ok in allowed):
                bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_of_workers_imports_only_what_it_may(room: str) -> None:
    assert forbidden_imports(room) == []


def test_the_boundary_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The check itself: an engine that reached into the output room is reported, with file and line."""
    engines = tmp_path / "workers" / "engines"
    engines.mkdir(parents=True)
    (engines / "leaky.py").write_text(
        "from varco.tasks.tags import parse\nfrom varco.workers import metrics\n"
        "def f():\n    from varco.workers.output.webhooks import send_event\n"
    )
    assert forbidden_imports("engines", tmp_path) == [
        "workers/engines/leaky.py:4 imports varco.workers.output.webhooks.send_event"
    ]


def test_node_starts_the_runtime_only_by_its_module_path() -> None:
    text = (ROOT / "workers" / "node" / "supervisor.py").read_text(encoding="utf-8")
    assert '"varco.workers.runtime.main"' in text
