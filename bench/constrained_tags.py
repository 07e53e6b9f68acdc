"""What tag-constrained decoding costs (issue 22): tokens/s with and without the constraint, both engines.

For each engine (hf, then vllm) on the tiny model: batch 1 and batch 16 of grounding jobs, each job
scripted to the card's grounding answer and cut by its budget, so constrained and free jobs generate
the same tokens and the difference is the mask alone. The first constrained job's compile time and
the compile cache's figures afterwards come from `tag_constraint.process_stats()` (vLLM's engine
core runs in-process on CPU, so its grammars count there too). One run, all figures.

On the tiny model a decode step is ~1 ms of compute, so the mask's CPU cost shows at its largest
share here; on a GPU at the 14B shapes (`bench/engine_gpu.py`) it is a share of a far longer step.

Run (CPU, ~2 minutes):   .venv/bin/python bench/constrained_tags.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from varco.tasks.tag_grammar import OutputShape
from varco.workers.devtools.scripted import ScriptBook, install
from varco.workers.devtools.tiny_model import make_tiny_model
from varco.workers.engines.base import EngineBackend, GenerationRequest
from varco.workers.engines.tag_constraint import process_stats

PROMPT = "<gro>\nDescribe the image in detail."


def card_grounding() -> str:
    from pathlib import Path

    for parent in Path(__file__).resolve().parents:
        path = parent / "shared" / "fixtures" / "card_grounding_output.txt"
        if path.is_file():
            return path.read_text(encoding="utf-8")[:-1]
    raise FileNotFoundError("shared/fixtures/card_grounding_output.txt")


def build(kind: str, model: str, book: ScriptBook) -> EngineBackend:
    engine: EngineBackend
    if kind == "hf":
        from varco.workers.engines.hf import HFEngine

        engine = HFEngine(model, max_batch_size=16, max_wait_ms=20)
    else:
        from varco.workers.engines.vllm import VLLMEngine, configure_cpu_defaults

        os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp())
        configure_cpu_defaults()
        engine = VLLMEngine(
            model, gpu_memory_utilization=0.1, max_num_seqs=16, max_model_len=8192, engine_args={"enforce_eager": True}
        )
    install(engine, book)
    return engine.load()


def run(engine: EngineBackend, batch: int, constrained: bool, budget: int, tag: str) -> tuple[float, int]:
    """Wall seconds and output tokens of `batch` jobs submitted together."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    shape = OutputShape.GROUNDED_TEXT if constrained else None
    requests = [GenerationRequest(image, PROMPT, budget, image_id=f"{tag}-{i}", constraint=shape) for i in range(batch)]
    started = time.perf_counter()
    outputs = [f.result() for f in [engine.submit(engine.prepare(r)) for r in requests]]
    return time.perf_counter() - started, sum(o.output_tokens for o in outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default="hf,vllm")
    args = parser.parse_args()
    model = str(make_tiny_model(tempfile.mkdtemp() + "/tiny-varco"))
    answer = card_grounding()
    table = Table(title=f"tag constraint, tiny model, CPU, budget {args.budget}, {args.rounds} rounds")
    for column in ("engine", "batch", "free tok/s", "constrained tok/s", "ratio"):
        table.add_column(column)
    notes: list[str] = []
    for kind in args.engines.split(","):
        book = ScriptBook({})
        engine = build(kind, model, book)
        try:
            before = process_stats()
            first = {}
            for batch in (1, 16):
                rates: dict[bool, float] = {}
                for constrained in (False, True):
                    seconds = tokens = 0.0
                    for r in range(args.rounds + 1):  # round 0 warms up (and compiles, the first time)
                        tag = f"{kind}-{batch}-{constrained}-r{r}"
                        for i in range(batch):
                            book.scripts[f"{tag}-{i}:{PROMPT}"] = answer
                        s, t = run(engine, batch, constrained, args.budget, tag)
                        if constrained and not first:
                            first = {"seconds": s, "stats": process_stats()}
                        if r:
                            seconds, tokens = seconds + s, tokens + t
                    rates[constrained] = tokens / seconds
                table.add_row(
                    kind, str(batch), f"{rates[False]:.0f}", f"{rates[True]:.0f}", f"{rates[True] / rates[False]:.2f}"
                )
            after = process_stats()
            compiled: Any = first["stats"]
            notes.append(
                f"{kind}: first constrained job {first['seconds'] * 1000:.0f} ms, of which compiling "
                f"{(compiled.compile_seconds - before.compile_seconds) * 1000:.1f} ms "
                f"({compiled.compiles - before.compiles} grammar); afterwards "
                f"{after.compiles - compiled.compiles} compiles and {after.cache_hits - compiled.cache_hits} cache hits"
            )
        finally:
            engine.stop()
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note)


if __name__ == "__main__":
    main()
