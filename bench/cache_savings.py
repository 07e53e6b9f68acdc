"""What the result cache (VARCO_RESULT_CACHE_TTL) saves on a workload with repeats: engine seconds and jobs/s.

The same workload runs twice through the whole queue, cache off (TTL 0) then on (TTL 3600): `Client.submit_many`
-> a private redis-server -> one `varco worker --gpus cpu --no-callbacks` (a fresh one per run, so the second run
starts with an empty cache) -> a file result store. The workload is `--jobs` jobs over `--pairs` distinct
image+task pairs (noise PNGs under VARCO_FILE_ROOT, tasks caption and ocr), in a shuffled order (fixed seed), sent
in chunks of `--chunk` jobs, each chunk waited for before the next: a stream of requests rather than one burst, so a
repeat usually arrives after its first answer is stored (the cache answers stored results; it does not merge jobs in
flight). Every job is scripted to generate exactly `--tokens` tokens, so each run asks the engine for the same work.

Figures per run: wall seconds from the first submit to the last final status, jobs/s, engine seconds (the worker's
`varco_engine_busy_seconds_total`: the time its engine thread spent generating, which on a GPU worker is GPU time),
the sum of the results' `timings.inference_s`, cache hits, and "GPU seconds saved" (engine seconds off - on).

Run (CPU, about a minute):   .venv/bin/python bench/cache_savings.py [--jobs 200 --pairs 50 --tokens 128]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.devtools.scripted import SCRIPTED_PLUGIN, SCRIPTS_FILE
from varco.workers.devtools.tiny_model import make_tiny_model

VARCO_WORKER = [sys.executable, "-m", "varco.producer.cli", "worker", "--gpus", "cpu", "--no-callbacks"]
TASKS = ("caption", "ocr")


@dataclass
class Run:
    ttl: int
    wall_s: float
    succeeded: int
    engine_s: float
    inference_s: float
    hits: int
    output_tokens: int


def metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"[{v}]" for _, v in sorted(sample.labels.items()))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def wait_ready(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the worker never became ready")


def make_images(images: Path, pairs: int, seed: int) -> list[tuple[Path, str]]:
    """`pairs` distinct (PNG, task) pairs: pairs/2 noise images, each asked for a caption and an OCR."""
    rng = random.Random(seed)
    out = []
    for index in range((pairs + len(TASKS) - 1) // len(TASKS)):
        image = Image.frombytes("RGB", (320, 240), rng.randbytes(320 * 240 * 3))
        path = images / f"img-{index:03d}.png"
        image.save(path, format="PNG")
        out += [(path, task) for task in TASKS]
    return out[:pairs]


def run_once(env: dict[str, str], ttl: int, workload: list[dict[str, Any]], chunk: int, log: Path) -> Run:
    port = free_port()
    env = {**env, "VARCO_RESULT_CACHE_TTL": str(ttl), "VARCO_METRICS_PORT": str(port)}
    with open(log, "w") as handle:
        worker = subprocess.Popen(VARCO_WORKER, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT)
    client = Client(settings_from_env(env))
    try:
        wait_ready(port)
        before = metrics(port)
        started = time.perf_counter()
        ids: list[str] = []
        for start in range(0, len(workload), chunk):
            batch = client.submit_many(workload[start : start + chunk])
            list(client.wait(batch, timeout=1800))
            ids += batch
        wall = time.perf_counter() - started
        results = [client.result(job_id) for job_id in ids]
        deadline = time.monotonic() + 30  # the worker counts a job just after its record says succeeded
        while True:
            after = metrics(port)
            done = sum(v for k, v in after.items() if k.startswith("varco_jobs_total[") and k.endswith("[succeeded]"))
            if done >= len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        client.close()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
    busy = "varco_engine_busy_seconds_total"
    return Run(
        ttl=ttl,
        wall_s=wall,
        succeeded=sum(r.state.value == "succeeded" for r in results),
        engine_s=after.get(busy, 0.0) - before.get(busy, 0.0),
        inference_s=sum(r.timings.inference_s for r in results),
        hits=sum(r.cached_from is not None for r in results),
        output_tokens=sum(r.usage.output_tokens for r in results),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=128, help="tokens every job generates (scripted)")
    parser.add_argument("--chunk", type=int, default=20, help="jobs submitted together, each chunk waited for")
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        pairs = make_images(images, args.pairs, args.seed)
        model = make_tiny_model(root / "model")
        scripts = {}
        for path, task in pairs:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            scripts[f"{digest}:{task}"] = "x" * args.tokens  # byte-level tokenizer: one token per character
        (model / SCRIPTS_FILE).write_text(json.dumps(scripts), encoding="utf-8")
        rng = random.Random(args.seed)
        workload = [
            {"image_uri": path.as_uri(), "task": task, "max_new_tokens": args.tokens + 8}
            for path, task in (pairs[i % len(pairs)] for i in range(args.jobs))
        ]
        rng.shuffle(workload)
        (root / "redis").mkdir()
        with start_redis(root / "redis") as redis:
            env = {
                "VARCO_BROKER_URL": redis.url,
                "VARCO_MODEL": str(model),
                "VARCO_ENGINE_PLUGINS": SCRIPTED_PLUGIN,
                "VARCO_RESULT_STORE": (root / "results").as_uri() + "/",
                "VARCO_FILE_ROOT": str(images),
            }
            runs = []
            for ttl in (0, 3600):
                env["VARCO_BROKER_URL"] = redis.url.rsplit("/", 1)[0] + f"/{len(runs)}"  # an empty index each run
                runs.append(run_once(env, ttl, workload, args.chunk, root / f"worker-{ttl}.log"))

    print(
        f"{args.jobs} jobs over {len(pairs)} distinct image+task pairs (320x240 noise PNGs, caption/ocr, "
        f"{args.tokens} tokens each), chunks of {args.chunk}, one CPU worker (tiny model)"
    )
    print("| cache | wall s | jobs/s | succeeded | cache hits | engine s | sum inference_s | output tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(
            f"| {'off' if r.ttl == 0 else f'on (TTL {r.ttl})'} | {r.wall_s:.2f} | {args.jobs / r.wall_s:.1f} | "
            f"{r.succeeded} | {r.hits} | {r.engine_s:.2f} | {r.inference_s:.2f} | {r.output_tokens:,} |"
        )
    off, on = runs
    saved = off.engine_s - on.engine_s
    share = 100 * saved / max(off.engine_s, 1e-9)
    speedup = off.wall_s / on.wall_s
    print(f"GPU (engine) seconds saved: {saved:.2f} of {off.engine_s:.2f} ({share:.0f}%); jobs/s x{speedup:.2f}")


if __name__ == "__main__":
    main()
