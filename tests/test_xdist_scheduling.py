"""`make test`'s split of the suite between two pytest-xdist processes (tests/xdist_scheduling.py), on a
small suite of its own laid out at the real paths: every file runs whole in one process, a group's files
all in one process, and the group goes out before the other files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("xdist", reason="pytest-xdist is in the test extra")

from xdist_scheduling import GROUPS

TESTS = Path(__file__).resolve().parent
CONFTEST = f"""
import sys

import pytest

sys.path.insert(0, {str(TESTS)!r})
from xdist_scheduling import FileOrGroupScheduling


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    return FileOrGroupScheduling(config, log)
"""
RECORDING = """
import os
from pathlib import Path

import pytest


@pytest.mark.parametrize("n", range({count}))
def test_record(n, request):
    with Path(os.environ["RECORD"]).open("a") as out:
        out.write(os.environ["PYTEST_XDIST_WORKER"] + " " + request.node.nodeid + "\\n")
"""
VLLM = sorted(path for path, group in GROUPS.items() if group == "vllm")
SUITE = {"tests/test_a.py": 5, "tests/test_b.py": 5, "tests/workers/test_c.py": 5, **dict.fromkeys(VLLM, 1)}


def test_every_grouped_file_exists() -> None:
    assert all((TESTS.parent / path).is_file() for path in GROUPS), GROUPS


def test_files_and_groups_stay_in_one_process_and_groups_go_first(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text(CONFTEST)
    for path, count in SUITE.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(RECORDING.format(count=count))
    record = tmp_path / "record.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env |= {"RECORD": str(record), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # xdist alone: a quicker start
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "xdist", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
         "tests"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    lines = [line.split(" ", 1) for line in record.read_text().splitlines()]
    assert len(lines) == sum(SUITE.values())
    workers_of: dict[str, set[str]] = defaultdict(set)
    first_of: dict[str, str] = {}
    for worker, nodeid in lines:
        path = nodeid.split("::")[0]
        workers_of[GROUPS.get(path, path)].add(worker)
        first_of.setdefault(worker, path)
    assert all(len(workers) == 1 for workers in workers_of.values()), dict(workers_of)
    assert any(GROUPS.get(path) == "vllm" for path in first_of.values()), first_of  # collected last, run first
