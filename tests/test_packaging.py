"""The producer-only wheel, installed in a fresh venv, imports under `varco` beside a backend's own `tasks.py`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_producer_wheel_installs_under_one_root_and_survives_a_local_tasks_module(tmp_path: Path) -> None:
    # Build from a clean copy: setuptools reuses a source tree's build/ folder, stale files included.
    source = tmp_path / "source"
    skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "tests", "bench")
    shutil.copytree(ROOT, source, ignore=skip)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)])
    (wheel,) = wheels.glob("varco_queue-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"varco"}, f"the wheel installs more than the varco root: {sorted(top)}"

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)])  # the base install: no extras

    backend = tmp_path / "backend"  # a web backend in the usual Celery layout, with its own tasks.py
    backend.mkdir()
    (backend / "tasks.py").write_text("OWN_TASKS = True\n")
    code = (
        "import sys, tasks\n"
        "from varco.producer import Client\n"
        "from varco.producer.webhooks import verify\n"
        "from varco.tasks.tags import parse\n"
        "assert tasks.OWN_TASKS, 'the backend lost its own tasks module'\n"
        "assert parse('<obj>a</obj><bbox>0.1, 0.1, 0.2, 0.2</bbox>').objects[0].label == 'a'\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'PIL'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = _run([str(python), "-c", code], cwd=backend)
    assert result.stdout.strip() == "ok"
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0, "the producer install pulled in torch"

    # Without the worker extra, `varco worker` says what to install and stops instead of restarting forever.
    worker = subprocess.run(
        [str(env_dir / "bin" / "varco"), "worker", "--gpus", "cpu", "--no-callbacks"],
        cwd=backend, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert worker.returncode == 1, worker.stdout + worker.stderr
    assert "pip install 'varco-queue[worker]'" in worker.stderr and "Traceback" not in worker.stderr
    # Without the gateway extra (no Pillow, no font), `varco overlay` says what to install.
    overlay = subprocess.run(
        [str(env_dir / "bin" / "varco"), "overlay", "some-job"],
        cwd=backend, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert overlay.returncode == 1, overlay.stdout + overlay.stderr
    assert "pip install 'varco-queue[gateway]'" in overlay.stderr and "Traceback" not in overlay.stderr
