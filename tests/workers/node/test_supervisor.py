"""The supervisor ends a dead child's whole process group (engine processes it started) and restarts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def read_pids(path: Path, not_before: tuple[int, int] | None = None, timeout: float = 30) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            pids = tuple(int(p) for p in path.read_text().split())
            if len(pids) == 2 and pids != not_before:
                return pids  # type: ignore[return-value]
        time.sleep(0.05)
    raise AssertionError(f"no (new) pids in {path}")


def gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a killed grandchild of ours may linger as a zombie until reaped by init; /proc tells
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split()[2] == "Z":
            return True
        time.sleep(0.05)
    return False


def test_a_dead_child_takes_its_process_group_with_it_and_is_restarted(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # A child that starts a long-lived process of its own, as the worker starts vLLM's engine core.
    script = f"sleep 300 & echo $$ $! > {pids}.tmp && mv {pids}.tmp {pids}; wait"
    code = (
        "import os; from varco.workers.node.supervisor import Child, supervise; "
        f"supervise([Child('engine', ['sh', '-c', {script!r}], dict(os.environ))], grace_s=10)"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", code])
    try:
        child, grandchild = read_pids(pids)
        os.kill(child, signal.SIGKILL)  # the worker process dies; its engine process would linger
        assert gone(grandchild), "the dead child's grandchild was left running"
        new_child, new_grandchild = read_pids(pids, not_before=(child, grandchild))
        assert new_child != child  # restarted
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
        assert gone(new_child) and gone(new_grandchild), "shutdown left processes behind"
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
