"""A worker child's quick exit keeps what Python's own exit does outside the process: threads joined,
atexit handlers run (logging's flush, the tracing SDK's), buffered output flushed, the exit status kept."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from varco.workers.runtime.fast_exit import exit_code

CHILD = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from varco.workers.runtime.fast_exit import exit_without_teardown

    record = Path(sys.argv[1])

    def note(what):
        with record.open("a") as out:
            out.write(what + "\\n")

    atexit.register(note, "atexit")
    threading.Thread(target=lambda: (time.sleep(0.3), note("thread"))).start()  # non-daemon: joined first
    ThreadPoolExecutor(1).submit(lambda: (time.sleep(0.3), note("pool")))  # never shut down by hand
    print("buffered, never flushed by hand", end="")  # stdout is a pipe: block-buffered
    exit_without_teardown(sys.argv[2] if sys.argv[2] == "why" else int(sys.argv[2]))
    note("after the exit")  # never reached
    """
)


@pytest.mark.parametrize(("code", "status"), [("3", 3), ("0", 0), ("why", 1)])
def test_threads_joined_atexit_run_output_flushed_status_kept(tmp_path: Path, code: str, status: int) -> None:
    record = tmp_path / "record.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a node's children are
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(record), code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == status, done.stderr
    assert done.stdout == "buffered, never flushed by hand"
    lines = record.read_text().splitlines()
    assert sorted(lines[:2]) == ["pool", "thread"] and lines[2:] == ["atexit"]
    if code == "why":
        assert done.stderr.strip() == "why"  # as sys.exit("why") reports it


def test_exit_code_as_sys_exit_takes_it() -> None:
    assert exit_code(None) == 0
    assert exit_code(78) == 78
    assert exit_code(256 + 75) == 75
    assert exit_code("cannot start") == 1
