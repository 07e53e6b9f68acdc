"""`varco demo`: the real pipeline end to end, starting whatever is not running.

Redis: VARCO_BROKER_URL if it answers, else a private redis-server on a free port. Model:
VARCO_MODEL if set, else the tiny offline model (built if missing) with scripted answers that
match the drawn images. A CPU worker is started through `varco worker`, every task type is
submitted for every sample (file:// and data: URIs), and the results are printed as a table.
Everything the demo started is stopped at the end.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from varco.tasks.prompts import TaskType
from varco.tasks.settings import Settings, settings_from_env
from varco.workers.devtools.local_redis import LocalRedis, answers, start_redis
from varco.workers.devtools.local_worker import stop_gracefully
from varco.workers.devtools.samples import Sample, samples
from varco.workers.devtools.scripted import SCRIPTED_PLUGIN, SCRIPTS_FILE

DEMO_DIR = Path(".demo")
TINY_DIR = Path(".models/tiny-varco")


def png_bytes(sample: Sample) -> bytes:
    buffer = io.BytesIO()
    sample.image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare_model(drawn: list[tuple[Sample, bytes]]) -> str:
    if os.environ.get("VARCO_MODEL"):
        return os.environ["VARCO_MODEL"]
    from varco.workers.devtools.tiny_model import make_tiny_model

    if not (TINY_DIR / "config.json").exists():
        make_tiny_model(TINY_DIR)
    scripts = {
        f"{hashlib.sha256(data).hexdigest()}:{task.value}": answer
        for sample, data in drawn
        for task, answer in sample.answers.items()
    }
    (TINY_DIR / SCRIPTS_FILE).write_text(json.dumps(scripts, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(TINY_DIR.resolve())


def demo_requests(drawn: list[tuple[Sample, bytes]], image_dir: Path) -> list[dict]:
    requests = []
    for sample, _ in drawn:
        uri = (image_dir / f"{sample.name}.png").resolve().as_uri()
        for task in TaskType:
            request: dict = {"image_uri": uri, "task": task.value, "metadata": {"sample": sample.name}}
            if task is TaskType.REFERRING:
                request |= {"region": list(sample.region), "label": sample.label}
            if task is TaskType.VQA:
                request["prompt"] = "What is in this image?"
            requests.append(request)
    # One inline image too, to show data: URIs.
    small = drawn[-1]
    inline = "data:image/png;base64," + base64.b64encode(small[1]).decode()
    requests.append({"image_uri": inline, "task": "grounding", "metadata": {"sample": small[0].name + " (data:)"}})
    return requests


def run_demo(console: Console, jobs_per_task: int = 1) -> int:
    from varco.producer.cli import wait_with_progress
    from varco.producer.client import Client

    DEMO_DIR.mkdir(exist_ok=True)
    image_dir, result_dir = DEMO_DIR / "images", DEMO_DIR / "results"
    image_dir.mkdir(exist_ok=True)
    drawn = [(s, png_bytes(s)) for s in samples()]
    for sample, data in drawn:
        (image_dir / f"{sample.name}.png").write_bytes(data)

    env = dict(os.environ)
    started_redis: LocalRedis | None = None
    broker = env.get("VARCO_BROKER_URL", Settings.model_fields["broker_url"].default)
    if answers(broker):
        console.print(f"Redis: using the one at {broker}")
    else:
        started_redis = start_redis(DEMO_DIR)
        broker = started_redis.url
        console.print(f"Redis: nothing answers at the configured URL; started a private redis-server at {broker}")
    env |= {
        "VARCO_BROKER_URL": broker,
        "VARCO_MODEL": prepare_model(drawn),
        "VARCO_FILE_ROOT": str(image_dir.resolve()),
        "VARCO_RESULT_STORE": env.get("VARCO_RESULT_STORE", result_dir.resolve().as_uri() + "/"),
        "VARCO_MAX_NEW_TOKENS": env.get("VARCO_MAX_NEW_TOKENS", "512"),
    }
    if not os.environ.get("VARCO_MODEL"):  # the tiny model answers from its scripts file
        env["VARCO_ENGINE_PLUGINS"] = SCRIPTED_PLUGIN
    settings = settings_from_env(env)
    log_path = DEMO_DIR / "worker.log"
    console.print(f"model: {settings.model}\nworker: `varco worker --gpus cpu` (log: {log_path})")
    with open(log_path, "w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "varco.producer.cli", "worker", "--gpus", "cpu"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        client = Client(settings)
        requests = demo_requests(drawn, image_dir) * jobs_per_task
        started = time.perf_counter()
        job_ids = client.submit_many(requests)
        console.print(f"submitted {len(job_ids)} jobs")
        statuses = wait_with_progress(client, job_ids, timeout=600)
        elapsed = time.perf_counter() - started
        show_results(console, client, requests, job_ids, statuses)
        ok = sum(s.state.value == "succeeded" for s in statuses.values())
        console.print(f"{ok}/{len(job_ids)} succeeded in {elapsed:.1f}s (including the worker start-up and model load)")
        console.print(f"result JSON files: {settings.result_store}<job_id>.json")
        return 0 if ok == len(job_ids) else 1
    finally:
        stop_gracefully(worker)
        if started_redis is not None:
            started_redis.stop()
            console.print("stopped the private redis-server")


def show_results(console: Console, client: object, requests: list[dict], job_ids: list[str], statuses: dict) -> None:
    table = Table(title="results", show_lines=False)
    for column in ("sample", "task", "state", "text", "objects / ocr (pixels)", "s"):
        table.add_column(column, overflow="fold")
    for request, job_id in zip(requests, job_ids, strict=True):
        status = statuses[job_id]
        if status.state.value != "succeeded":
            error = status.error.type + ": " + status.error.message if status.error else ""
            table.add_row(
                request["metadata"]["sample"], request["task"], f"[red]{status.state.value}[/]", error, "", ""
            )
            continue
        result = client.result(job_id)
        found = [f"{o.label}: {o.boxes_px}" for o in result.output.objects]
        found += [f"{o.text}: {list(o.box_px or ())}" for o in result.output.ocr]
        table.add_row(
            request["metadata"]["sample"], request["task"], "[green]succeeded[/]",
            result.output.text[:70], "\n".join(found), f"{result.timings.total_s:.2f}",
        )  # fmt: skip
    console.print(table)
