"""The base install (no extras) in a fresh venv: the wheel imports under `varco` beside a backend's own
`tasks.py`, and the tests that need only the base install pass there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
# Parser, request validation, webhook signing and the client's own checks: none needs torch or Pillow.
BASE_INSTALL_TESTS = [
    "tasks/test_tags_card.py",
    "tasks/test_tags_robust.py",
    "tasks/test_requests.py",
    "producer/test_webhooks.py",
    "producer/test_client_checks.py",
    "tasks/test_settings.py",
]
# Test tools only: the project itself is installed with no extras.
TEST_TOOLS = ["pytest>=8", "hypothesis>=6.100"]


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@dataclass
class BaseInstall:
    wheel: Path
    env_dir: Path

    @property
    def python(self) -> Path:
        return self.env_dir / "bin" / "python"


@pytest.fixture(scope="module")
def base_install(tmp_path_factory: pytest.TempPathFactory) -> BaseInstall:
    """The project's wheel installed in a fresh venv with no extras."""
    tmp_path = tmp_path_factory.mktemp("base-install")
    # Build from a clean copy: setuptools reuses a source tree's build/ folder, stale files included.
    source = tmp_path / "source"
    skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "tests", "bench", "mutants")
    shutil.copytree(ROOT, source, ignore=skip)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)])
    (wheel,) = wheels.glob("varco_queue-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    _run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)])  # the base install: no extras
    return BaseInstall(wheel, env_dir)


def test_producer_wheel_installs_under_one_root_and_survives_a_local_tasks_module(
    base_install: BaseInstall, tmp_path: Path
) -> None:
    with zipfile.ZipFile(base_install.wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"varco"}, f"the wheel installs more than the varco root: {sorted(top)}"
    env_dir, python = base_install.env_dir, base_install.python

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

    # Without the gateway extra, `varco gateway` says what to install.
    gateway = subprocess.run(
        [str(env_dir / "bin" / "varco"), "gateway", "--no-auth"],
        cwd=backend, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert gateway.returncode == 1, gateway.stdout + gateway.stderr
    assert "pip install 'varco-queue[gateway]'" in gateway.stderr and "Traceback" not in gateway.stderr


def test_base_install_tests_pass_without_any_extra(base_install: BaseInstall, tmp_path: Path) -> None:
    """The parser, request, signing and client tests, run by the base install's own interpreter."""
    python = str(base_install.python)
    _run([python, "-m", "pip", "install", "-q", *TEST_TOOLS])
    missing = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    assert missing and subprocess.run([python, "-c", "import PIL"], capture_output=True).returncode != 0
    # A copy of the tests outside the checkout (so `varco` can only come from the install), with the
    # model-card fixtures they read.
    tests = tmp_path / "tests"
    tests.mkdir()
    for name in ["conftest.py", "helpers.py", "tag_invariants.py", *BASE_INSTALL_TESTS]:
        (tests / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "tests" / name, tests / name)
    shutil.copytree(FIXTURES, tmp_path / "shared" / "fixtures")
    result = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *BASE_INSTALL_TESTS],
        cwd=tests, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
