"""The producer side installs without torch: importing it must not pull torch or workers in."""

from __future__ import annotations

import subprocess
import sys


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
