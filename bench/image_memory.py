"""Memory under images at the limits: a worker given six 8000x8000 jobs at once, a gateway drawing their overlay.

An 8000x8000 PNG of zeros is 187 KB on disk and sits exactly at the 64 Mpx limit (issue 20 §3). This
starts a private Redis, `varco worker --gpus cpu` (hf engine, tiny model: the model's size is not what is
measured) and `varco gateway --no-auth`, then measures, with Linux's own peak counter (VmHWM, reset through
/proc/PID/clear_refs once the process is idle):
- the worker's inference process: idle RSS, peak RSS while six such jobs run at once, RSS 5 s after;
- the gateway: idle RSS, peak RSS while four requests for one job's overlay.png run at once, RSS 5 s after.

Targets: the worker's peak at most 1 GB over idle and back within 10% of idle; the gateway's peak at
most 300 MB over idle. Run: `.venv/bin/python bench/image_memory.py`.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from PIL import Image

from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.devtools.local_worker import VARCO_CLI, stop_gracefully
from varco.workers.devtools.tiny_model import make_tiny_model

MB = 1024 * 1024


def zeros_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS


def peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def settle(pid: int, seconds: float = 5.0) -> int:
    time.sleep(seconds)
    return rss(pid)


def inference_process(worker: subprocess.Popen, timeout_s: float = 120.0) -> int:
    """The pid of the worker's child that runs varco.infer: the largest process of its tree once loaded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = psutil.Process(worker.pid).children(recursive=True)
        if children:
            return max(children, key=lambda p: p.memory_info().rss).pid
        time.sleep(0.5)
    raise RuntimeError("the worker started no child")


def row(name: str, idle: int, top: int, after: int) -> str:
    return (f"| {name} | {idle / MB:.0f} MB | {top / MB:.0f} MB | +{(top - idle) / MB:.0f} MB | {after / MB:.0f} MB "
            f"| {100 * (after - idle) / idle:+.1f}% |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=8000)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--overlays", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, results = root / "images", root / "results"
        images.mkdir()
        (images / "big.png").write_bytes(zeros_png(args.side))
        (images / "small.png").write_bytes(zeros_png(64))
        print(f"{args.side}x{args.side} PNG of zeros: {(images / 'big.png').stat().st_size / 1024:.0f} KB")
        redis = start_redis(root)
        env = {
            "VARCO_BROKER_URL": redis.url,
            "VARCO_MODEL": str(make_tiny_model(root / "model")),
            "VARCO_RESULT_STORE": results.as_uri() + "/",
            "VARCO_FILE_ROOT": str(images),
            "VARCO_METRICS_PORT": str(free_port()),
            "VARCO_MAX_NEW_TOKENS": "1",
        }
        quiet = {"env": {**os.environ, **env}, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        worker = subprocess.Popen([*VARCO_CLI, "worker", "--gpus", "cpu", "--no-callbacks"], **quiet)
        port = free_port()
        gateway = subprocess.Popen([*VARCO_CLI, "gateway", "--no-auth", "--port", str(port)], **quiet)
        client = Client(settings_from_env(env))
        rows = []
        try:
            small = client.submit((images / "small.png").as_uri(), "caption")
            assert next(client.wait(small, timeout=600)).state.value == "succeeded"  # model loaded, code warm
            pid = inference_process(worker)
            idle = settle(pid)
            reset_peak(pid)
            jobs = [client.submit((images / "big.png").as_uri(), "caption") for _ in range(args.jobs)]
            states = [next(client.wait(j, timeout=600)).state.value for j in jobs]
            assert states == ["succeeded"] * args.jobs, states
            top = peak(pid)
            rows.append(row(f"worker (inference process), {args.jobs} jobs at once", idle, top, settle(pid)))

            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=600) as http:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if http.get("/livez").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "gateway never started"
                    time.sleep(0.2)
                assert http.get(f"/v1/jobs/{small}/overlay.png").status_code == 200  # warm: Pillow, the font
                idle = settle(gateway.pid)
                reset_peak(gateway.pid)
                started = time.monotonic()
                with ThreadPoolExecutor(args.overlays) as pool:
                    answers = list(pool.map(lambda _: http.get(f"/v1/jobs/{jobs[0]}/overlay.png"),
                                            range(args.overlays)))  # fmt: skip
                elapsed = time.monotonic() - started
                assert [a.status_code for a in answers] == [200] * args.overlays
                top = peak(gateway.pid)
                rows.append(row(f"gateway, {args.overlays} overlays of one job at once ({elapsed:.1f} s)", idle,
                                top, settle(gateway.pid)))  # fmt: skip
        finally:
            client.close()
            stop_gracefully(gateway)
            stop_gracefully(worker)
            redis.stop()
    print("| process | idle RSS | peak RSS | peak over idle | RSS 5 s after | after vs idle |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
