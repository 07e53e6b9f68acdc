"""Engine-level demo: the tiny (or configured) model answers every task on the drawn samples."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tasks.requests import validate_request
from tasks.tags import parse
from workers.engine import Engine, GenerationRequest
from workers.samples import samples
from workers.tiny_model import make_tiny_model

DEFAULT_TINY_DIR = Path(".models/tiny-varco")


def ensure_tiny_model(directory: Path = DEFAULT_TINY_DIR) -> Path:
    if not (directory / "config.json").exists():
        make_tiny_model(directory)
    return directory


def run_engine_demo(model: str | None, console: Console) -> None:
    scripted = model is None
    model_path = str(ensure_tiny_model()) if model is None else model
    engine = Engine(model_path).load()
    console.print(f"model [bold]{model_path}[/] loaded on {engine.device} in {engine.load_seconds:.1f}s")
    jobs = []
    for sample in samples():
        for task, answer in sample.answers.items():
            fields = {"region": sample.region, "label": sample.label} if task == "referring" else {}
            if task == "vqa":
                fields["prompt"] = "What is in this image?"
            request = validate_request(image_uri=f"file:///{sample.name}.png", task=task, **fields)
            script = answer if scripted else None
            jobs.append((sample, request, GenerationRequest(sample.image, request.model_prompt, 256, script)))
    started = time.perf_counter()
    outputs = engine.generate([g for _, _, g in jobs])
    elapsed = time.perf_counter() - started
    table = Table(title=f"{len(jobs)} requests in one batch, {elapsed:.2f}s" + (" (scripted tiny model)" * scripted))
    for column in ("image", "task", "text", "objects", "ocr", "warnings"):
        table.add_column(column, overflow="fold")
    parsed = []
    for (sample, request, _), out in zip(jobs, outputs, strict=True):
        result = parse(out.text, sample.image.size)
        parsed.append(result)
        table.add_row(
            f"{sample.name} {sample.image.width}x{sample.image.height}",
            request.task.value,
            result.text[:80],
            "; ".join(f"{o.label}: {o.boxes_px}" for o in result.objects),
            "; ".join(f"{o.text}: {o.box_px}" for o in result.ocr),
            str(len(result.warnings)),
        )
    console.print(table)
    console.print("output object of the first grounding request:")
    console.print_json(json.dumps(parsed[1].model_dump(), ensure_ascii=False))
