"""Fuzz the gateway with schemathesis, stateful, as each of two API keys (issue 20).

Starts a private redis-server and the gateway (two keys, no worker: jobs stay queued, the API's state
machine is what is walked), then runs `st run --checks all` once per key: its coverage, fuzzing and
stateful phases (submit -> status -> result/events/cancel by the links schemathesis infers). The
repository's schemathesis.toml applies. Exits non-zero if either run finds a failure.

    python bench/fuzz_gateway.py --max-examples 100      # what bench/RESULTS.md records
    python bench/fuzz_gateway.py --max-examples 10       # `make fuzz`
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from varco.gateway.app import create_app
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import free_port, start_redis

KEYS = ("fuzz-alice-0123456789abcdef", "fuzz-bob-fedcba9876543210")
ROOT = Path(__file__).resolve().parents[1]


def fuzz(base: str, key: str, max_examples: int, phases: str) -> int:
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json", "--checks", "all",
               "--phases", phases, "--max-examples", str(max_examples), "--no-color",
               "-H", f"Authorization: Bearer {key}"]  # fmt: skip
    return subprocess.run(command, cwd=ROOT).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--phases", default="coverage,fuzzing,stateful")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, start_redis(Path(tmp)) as redis_server:
        results = Path(tmp) / "results"
        results.mkdir()
        settings = Settings(broker_url=redis_server.url, result_store=results.as_uri() + "/")
        port = free_port()
        config = uvicorn.Config(create_app(settings, list(KEYS)), host="127.0.0.1", port=port, log_level="error")
        server = uvicorn.Server(config)
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        started, codes = time.monotonic(), []
        for key in KEYS:
            codes.append(fuzz(f"http://127.0.0.1:{port}", key, args.max_examples, args.phases))
        server.should_exit = True
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu = children.ru_utime + children.ru_stime + own.ru_utime + own.ru_stime
    print(f"fuzz_gateway: exit codes {codes}, {time.monotonic() - started:.0f} s wall, {cpu:.0f} s CPU (gateway + st)")
    return max(codes)


if __name__ == "__main__":
    raise SystemExit(main())
