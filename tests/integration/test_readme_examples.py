"""The README's examples run as a user would run them, top to bottom, in one fresh directory.

Every fenced code block in README.md is preceded by a marker comment saying what the test does with it:

- `<!-- readme-example: stack -->` (exactly one: "Run a worker and a gateway by hand"): run with bash in the
  background, with free ports in place of 6379 and 8000; it must start a Redis, a CPU worker (the scripted
  engine on the tiny model: VARCO_MODEL and VARCO_ENGINE_PLUGINS, as the README says) and a gateway that answer.
  The environment it exports is the environment of every block below, as in the user's shell.
- `<!-- readme-example: python; prints: TEXT -->`, `bash; prints: TEXT`: run against that stack (the gateway's
  free port in place of 8000), in the directory holding `images/cat.png`; must exit 0 and print TEXT.
- `<!-- readme-example: background -->`: a command that serves (another `varco gateway`): run in the
  background on a free port; it must answer, and accept the first of its VARCO_API_KEYS.
- `<!-- readme-example: not-run: WHY -->` for a block that cannot run here (installs, a GPU); WHY names the
  test that covers it, if any. `<!-- readme-example: output -->` for a sample of output or a fragment.

A block without a marker fails `test_every_readme_code_block_is_marked`, so no example slips in untested.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from conftest import CAT, write_scripts

from varco.workers.devtools.local_redis import free_port
from varco.workers.devtools.scripted import SCRIPTED_PLUGIN

README = Path(__file__).resolve().parents[2] / "README.md"
ROOT = README.parent
_FENCE = re.compile(r"^\s*```")
_MARKER = re.compile(r"^<!-- readme-example: (.*?) -->$")
_RUNNABLE = re.compile(r"(python|bash); prints: (.+)")
# The ports a user's stack listens on, where a block names them (`--port 6379`, `localhost:8000`).
_PORT = re.compile(r"(?:(?<=localhost:)|(?<=--port ))(6379|8000)\b")
STARTUP_S = 180  # worker and gateway start on a loaded 2-core CI machine: a deadline, not a measurement


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    marker: str | None  # what follows `readme-example:`, or None
    code: str


def code_blocks(text: str) -> list[Block]:
    """Every fenced code block of a Markdown text, with the marker on the line just above its fence."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if _FENCE.match(lines[i]):
            end = next((j for j in range(i + 1, len(lines)) if _FENCE.match(lines[j])), len(lines))
            marker = _MARKER.match(lines[i - 1].strip()) if i else None
            blocks.append(Block(i + 1, marker.group(1) if marker else None, "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


def unaccounted(blocks: list[Block]) -> list[str]:
    """Blocks with no marker, or one the test does not know; `not-run` needs its reason."""
    bad = []
    for b in blocks:
        m = b.marker
        if m is None or not (m in ("stack", "background", "output") or _RUNNABLE.fullmatch(m) or
                             re.fullmatch(r"not-run: \S.*", m)):  # fmt: skip
            bad.append(f"README.md:{b.line}: {m!r}")
    return bad


BLOCKS = code_blocks(README.read_text(encoding="utf-8"))


def _of(kind: str) -> list[Block]:
    return [b for b in BLOCKS if b.marker == kind]


RUNNABLE = [b for b in BLOCKS if b.marker and _RUNNABLE.fullmatch(b.marker)]


def test_every_readme_code_block_is_marked() -> None:
    assert unaccounted(BLOCKS) == []
    assert len(_of("stack")) == 1, "one block starts the services the examples run against"
    assert {_RUNNABLE.fullmatch(b.marker).group(1) for b in RUNNABLE} == {"python", "bash"}  # type: ignore[union-attr]
    for b in BLOCKS:  # a reason that names a test names one that exists
        for path in re.findall(r"tests/[\w/]+\.py", b.marker or ""):
            assert (ROOT / path).is_file(), f"README.md:{b.line} names {path}"


def test_the_block_finder_sees_unmarked_and_unknown_blocks() -> None:
    text = (
        "<!-- readme-example: python; prints: 1 -->\n```python\nprint(1)\n```\n\n```bash\nexit 1\n```\n"
        "<!-- readme-example: pyhton -->\n```\nx\n```\n<!-- readme-example: not-run: -->\n```\ny\n```\n"
    )
    blocks = code_blocks(text)
    assert [(b.line, b.marker, b.code) for b in blocks] == [
        (2, "python; prints: 1", "print(1)"), (6, None, "exit 1"), (10, "pyhton", "x"), (14, "not-run:", "y"),
    ]  # fmt: skip
    assert unaccounted(blocks) == ["README.md:6: None", "README.md:10: 'pyhton'", "README.md:14: 'not-run:'"]


# --- running them --------------------------------------------------------------------------------------
def _base_env(tiny_model_dir: Path) -> dict[str, str]:
    """What the user's shell holds before the README: a PATH with `varco`, and the development engine."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "VARCO_MODEL": str(tiny_model_dir),
        "VARCO_ENGINE_PLUGINS": SCRIPTED_PLUGIN,
        "VARCO_METRICS_PORT": str(free_port()),  # never 9808, which a real node on this machine may hold
    }


def _with_ports(code: str, ports: dict[str, int]) -> str:
    return _PORT.sub(lambda m: str(ports[m.group(1)]), code)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running (zombies left to their reaper do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _stop(shell: subprocess.Popen) -> Callable[[], None]:
    """SIGTERM to the shell's process group (the shell and what it left running: `varco worker` passes it on to
    its children, in-flight jobs finish); returns the wait for them to end, SIGKILL to what is left after 60 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(shell.pid, signal.SIGTERM)

    def wait() -> None:
        deadline = time.monotonic() + 60
        with contextlib.suppress(ProcessLookupError):
            while shell.poll() is None or _group_alive(shell.pid):
                if time.monotonic() > deadline:
                    os.killpg(shell.pid, signal.SIGKILL)
                time.sleep(0.2)

    return wait


@contextlib.contextmanager
def _in_background(
    code: str, env: dict[str, str], cwd: Path, log: Path, stopped: list[Callable[[], None]] | None = None
) -> Iterator[subprocess.Popen]:
    """`code` run by bash in a process group of its own, as the user would paste it; stopped on exit. With
    `stopped`, the wait for the group to end is appended there instead of done here."""
    with open(log, "w") as out:
        shell = subprocess.Popen(
            ["bash", "-eo", "pipefail", "-c", code],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield shell
    finally:
        wait = _stop(shell)
        if stopped is None:
            wait()
        else:
            stopped.append(wait)


def _wait_for(url: str, log: Path, serving: subprocess.Popen | None = None) -> None:
    """Until `url` answers 200; `serving`, if given, must not exit meanwhile."""
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert serving is None or serving.poll() is None, f"it exited:\n{log.read_text()[-5000:]}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, f"{url} never answered 200:\n{log.read_text()[-5000:]}"
        time.sleep(0.2)


@dataclass(frozen=True)
class Stack:
    env: dict[str, str]  # the user's shell after the stack block
    home: Path  # the directory the user works in: images/, results/
    gateway_port: int


@pytest.fixture(scope="session")
def stopped() -> Iterator[list[Callable[[], None]]]:
    """Waits left for the end of the session: a worker's warm shutdown runs beside the tests that follow."""
    waits: list[Callable[[], None]] = []
    yield waits
    for wait in waits:
        wait()


@pytest.fixture(scope="module")
def stack(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, stopped: list[Callable[[], None]]
) -> Iterator[Stack]:
    """The README's by-hand recipe, run: its Redis, worker and gateway serve every example below."""
    write_scripts(tiny_model_dir)  # the scripted answers the worker fixture uses (the same file)
    home = tmp_path_factory.mktemp("readme")
    (home / "images").mkdir()
    (home / "images" / "cat.png").write_bytes(CAT)
    ports = {"6379": free_port(), "8000": free_port()}
    code, base = _with_ports(_of("stack")[0].code, ports), _base_env(tiny_model_dir)
    assert all(str(port) in code for port in ports.values()), "the recipe no longer names ports 6379 and 8000"
    log, env_file = home / "stack.log", home / "stack.env"
    try:
        with _in_background(f"{code}\nenv -0 > {env_file}", base, home, log, stopped) as shell:
            assert shell.wait(timeout=60) == 0, log.read_text()  # it leaves its services running, and ends
            env = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if item)
            _wait_for(f"http://127.0.0.1:{ports['8000']}/livez", log)
            _wait_for(f"http://127.0.0.1:{base['VARCO_METRICS_PORT']}/readyz", log)  # model loaded, Redis answers
            yield Stack(env, home, ports["8000"])
    finally:  # Redis daemonized, out of the group: shut down once the worker has finished its jobs
        stopped.append(lambda: _shutdown_redis(ports["6379"]))


def _shutdown_redis(port: int) -> None:
    with contextlib.suppress(redis.RedisError):
        redis.Redis(port=port).shutdown(nosave=True)


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: f"line{b.line}")
def test_a_readme_example_runs(block: Block, stack: Stack) -> None:
    language, expected = _RUNNABLE.fullmatch(block.marker).groups()  # type: ignore[union-attr]
    code = _with_ports(block.code, {"8000": stack.gateway_port})
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-eo", "pipefail", "-c", code]
    done = subprocess.run(command, cwd=stack.home, env=stack.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert expected in done.stdout, done.stdout[-3000:]


@pytest.mark.parametrize("block", _of("background"), ids=lambda b: f"line{b.line}")
def test_a_readme_service_starts_and_answers(block: Block, stack: Stack) -> None:
    """It serves in the foreground: it must come up on its port and take the first key it was given."""
    port = free_port()
    log = stack.home / f"background-{block.line}.log"
    env = {k: v for k, v in stack.env.items() if k != "VARCO_API_KEYS"}
    key = re.search(r"VARCO_API_KEYS=([^,\s]+)", block.code).group(1)  # type: ignore[union-attr]
    with _in_background(_with_ports(block.code, {"8000": port}), env, stack.home, log) as shell:
        _wait_for(f"http://127.0.0.1:{port}/livez", log, shell)
        missing = f"http://127.0.0.1:{port}/v1/jobs/0123456789abcdef0123456789abcdef"
        assert httpx.get(missing, timeout=10).status_code == 401
        assert httpx.get(missing, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 404
