"""Full-size engine benchmark: VARCO-VISION-14B shapes with random weights, bf16, on one GPU, either backend.

Builds the real architecture (Qwen2.5-14B text model: hidden 5120, 48 layers, 40 heads / 8 KV heads,
MLP 13824, vocab 152064; SigLIP-so400m-patch14-384 vision tower; anyres_max_9 over the 384…2304
pinpoints) with random weights, then times the engine through its own API (`prepare` + `submit`),
with every request scripted to generate exactly its budget:

- N images of 640x480 with a fixed number of new tokens, one at a time versus all submitted at once
  (hf: batches of up to `--batch`; vllm: continuous batching up to `--max-num-seqs`);
- the mixed workload of `engine_compare.py` (task types, budgets 8-512, several image sizes);
- with `--constrained`, the same N images again all at once, decoded under the grounding tag grammar
  (issue 22), beside the free run: ms per step (wall / new tokens) with and without the mask, which is
  computed on the CPU. The forced answer (`a` repeated) is valid grounded text, so both runs generate
  the same tokens and the difference is the mask alone.

hf: the model is built in memory on the GPU and wrapped in `HFModel`, as `HFModel.load()` would leave it.
vllm: vLLM makes the random weights itself (`load_format="dummy"`) from a directory holding only the
config, tokenizer and processor files.

Run on a GPU machine:   python bench/engine_gpu.py --engine hf|vllm [--images 16] [--new-tokens 128] [--batch 16]
                        [--constrained]
Smoke-test on a CPU:    python bench/engine_gpu.py --engine hf|vllm --shrink
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# vLLM reads its logging level at import: keep its per-request notices out of the figures.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import numpy as np
import torch
import transformers
from models import build_config, save_config_only
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast
from workload import (
    IMAGE_SIZES,
    Job,
    describe,
    make_job,
    mixed_jobs,
    reset_caches,
    run_jobs,
    script,
    summarise,
    warmup_jobs,
)

from varco.tasks.prompts import TaskType
from varco.tasks.tag_grammar import OutputShape
from varco.workers.devtools.scripted import ScriptBook, install
from varco.workers.devtools.tiny_model import build_tokenizer
from varco.workers.engines.base import EngineBackend
from varco.workers.engines.hf_model import attention_implementation

TILE, PATCH = 384, 14  # the real SigLIP-so400m-patch14-384 tower


def varco_config(tokenizer: PreTrainedTokenizerFast, shrink: bool) -> LlavaOnevisionConfig:
    """VARCO-VISION-14B's shapes; `shrink` keeps the vocabulary, tiles and prompts but makes every layer tiny."""
    text: dict[str, Any] = {
        "vocab_size": 152064,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "rope_theta": 1_000_000.0,
    }
    vision: dict[str, Any] = {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 26,
        "num_attention_heads": 16,
    }
    if shrink:  # same code path, CPU-sized; head size 32 in both towers (vLLM's CPU attention takes no less)
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        text.update(num_key_value_heads=1)
        vision.update(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return build_config(tokenizer, text, vision, TILE, PATCH, tie_word_embeddings=False)


def build_hf(model_dir: Path, config: LlavaOnevisionConfig, device: str, args: argparse.Namespace) -> EngineBackend:
    """The random-weight model built straight on the device, adopted by HFModel as load() would."""
    from varco.workers.engines.hf import HFEngine
    from varco.workers.engines.hf_model import HFModel

    hf_model = HFModel(str(model_dir), device=device)
    config._attn_implementation = attention_implementation(device)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=hf_model.dtype).eval()
    hf_model.use(model, transformers.AutoProcessor.from_pretrained(model_dir))
    return HFEngine(
        str(model_dir),
        max_batch_size=args.batch,
        max_wait_ms=args.max_wait_ms,
        max_batch_tokens=args.max_batch_tokens,
        hf_model=hf_model,
    )


def build_vllm(model_dir: Path, args: argparse.Namespace) -> EngineBackend:
    from varco.workers.engines.vllm import VLLMEngine, configure_cpu_defaults

    configure_cpu_defaults()
    extra: dict[str, Any] = {"load_format": "dummy", "enforce_eager": args.eager}
    if not torch.cuda.is_available():
        extra["kv_cache_memory_bytes"] = 2**30  # a fixed KV cache on CPU, not a share of whatever RAM is free
    return VLLMEngine(
        str(model_dir),
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        engine_args=extra,
    )


def parameter_count(config: LlavaOnevisionConfig) -> int:
    """Counted on the meta device: no memory, and the same figure whichever engine makes the weights."""
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration._from_config(config)
    return sum(p.numel() for p in model.parameters())


class Memory:
    """Peak GPU memory of a phase: torch's allocator for hf (in this process); device-wide use for vllm,
    whose engine core runs in a child process and holds its KV cache from the start."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.cuda = torch.cuda.is_available()

    def reset(self) -> None:
        if self.cuda and self.engine == "hf":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> str:
        if not self.cuda:
            return "n/a (CPU)"
        if self.engine == "hf":
            return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak allocated"
        free, total = torch.cuda.mem_get_info()
        return f"{(total - free) / 2**30:.1f} GiB in use on the device"


def same_size_jobs(count: int, new_tokens: int, seed: int = 0) -> list[Job]:
    rng = np.random.default_rng(seed)
    return [make_job(i, TaskType.GROUNDING, new_tokens, (640, 480), rng) for i in range(count)]


def timed_sequential(engine: EngineBackend, jobs: Sequence[Job]) -> float:
    started = time.perf_counter()
    for job in jobs:
        engine.generate(job.request)
    return time.perf_counter() - started


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--shrink", action="store_true", help="tiny dimensions, for a CPU smoke test")
    parser.add_argument("--images", type=int, default=None, help="same-size images (default 16; --shrink: 4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="per image (default 128; --shrink: 8)")
    parser.add_argument("--batch", type=int, default=16, help="hf: the largest batch")
    parser.add_argument("--constrained", action="store_true", help="also time the batch under the tag grammar")
    parser.add_argument("--mixed-jobs", type=int, default=None, help="mixed workload jobs (default 48; --shrink: 8)")
    parser.add_argument("--mixed-max-budget", type=int, default=None, help="(default 512; --shrink: 32)")
    parser.add_argument("--max-wait-ms", type=int, default=20)
    parser.add_argument("--max-batch-tokens", type=int, default=65536)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="vllm: the most sequences in flight")
    parser.add_argument("--max-model-len", type=int, default=16384, help="vllm")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9 if gpu else 0.1, help="vllm")
    parser.add_argument(
        "--eager", action=argparse.BooleanOptionalAction, default=not gpu, help="vllm enforce_eager (CPU: on)"
    )
    args = parser.parse_args(argv)
    if not gpu and not args.shrink:
        parser.error("the full-size model needs a GPU (about 30 GB in bf16, twice that in float32); use --shrink")
    small = args.shrink
    args.images = args.images if args.images is not None else (4 if small else 16)
    args.new_tokens = args.new_tokens if args.new_tokens is not None else (8 if small else 128)
    args.mixed_jobs = args.mixed_jobs if args.mixed_jobs is not None else (8 if small else 48)
    args.mixed_max_budget = args.mixed_max_budget if args.mixed_max_budget is not None else (32 if small else 512)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, engine {args.engine}, "
        f"{len(os.sched_getaffinity(0))} cores, device {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}"
    )
    same = same_size_jobs(args.images, args.new_tokens)
    mixed = mixed_jobs(args.mixed_jobs, seed=0, max_budget=args.mixed_max_budget)
    warm = warmup_jobs()
    book = ScriptBook({})
    script(book, [*warm, *same, *mixed])  # exact token counts whatever the random weights say

    with tempfile.TemporaryDirectory(prefix="engine-gpu-") as tmp:
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tmp) / "vllm-cache"))
        model_dir = Path(tmp) / "random-varco-14b-shapes"
        tokenizer = build_tokenizer()
        config = varco_config(tokenizer, args.shrink)
        # Both engines read the tokenizer and processor from here (the scripted plugin too); vLLM also the config.
        save_config_only(model_dir, config, tokenizer, TILE, PATCH)
        started = time.perf_counter()
        engine = build_hf(model_dir, config, device, args) if args.engine == "hf" else build_vllm(model_dir, args)
        install(engine, book)  # before load: vLLM takes its logits processors at start-up
        engine.load()
        built_s = time.perf_counter() - started
        params = parameter_count(config)
        print(f"built {params / 1e9:.2f} B parameters, {args.engine} engine on {device} in {built_s:.1f}s")
        memory = Memory(args.engine)
        try:
            run_jobs(engine, warm)
            memory.reset()
            single = timed_sequential(engine, same)
            peak_single = memory.peak_gib()
            reset_caches(engine)  # the same images again: no prefix or image-cache hits for vllm
            memory.reset()
            results, batched = run_jobs(engine, same)
            peak_batched = memory.peak_gib()
            prompt = results[0].output.prompt_tokens
            exact = all(r.output.output_tokens == args.new_tokens for r in results)
            label = f"batch {args.batch}" if args.engine == "hf" else f"all at once (max_num_seqs {args.max_num_seqs})"
            print(f"{args.images} images 640x480, {args.new_tokens} forced new tokens each, prompt {prompt} tokens")
            print(f"  one at a time: {single:.2f}s  {args.images / single:.2f} img/s  {peak_single}")
            print(f"  {label}: {batched:.2f}s  {args.images / batched:.2f} img/s  {peak_batched}")
            if not exact:
                print("  (!) some requests did not generate exactly their budget")
            if args.constrained:
                constrained_run(engine, same, batched, args)

            memory.reset()
            summary = summarise(*run_jobs(engine, mixed))
            print(f"mixed workload: {describe(mixed)}; image sizes {', '.join(f'{w}x{h}' for w, h in IMAGE_SIZES)}")
            print(
                f"  wall {summary.wall_s:.2f}s  {summary.jobs_per_s:.2f} img/s  {summary.tokens_per_s:.0f} out tok/s  "
                f"p50 {summary.p50_s:.2f}s  p95 {summary.p95_s:.2f}s  {memory.peak_gib()}"
                + ("" if summary.exact else "  (!) not every job generated exactly its budget")
            )
            count, total = batch_size_totals()
            if count:
                print(f"  {count} generate calls / engine steps over the whole run, {total / count:.1f} rows each")
        finally:
            engine.stop()


def constrained_run(engine: EngineBackend, same: Sequence[Job], free_s: float, args: argparse.Namespace) -> None:
    """The same images all at once under the grounding grammar, beside the free run just timed."""
    from varco.workers.engines.tag_constraint import process_stats

    jobs = [
        dataclasses.replace(job, request=dataclasses.replace(job.request, constraint=OutputShape.GROUNDED_TEXT))
        for job in same
    ]
    reset_caches(engine)
    results, constrained_s = run_jobs(engine, jobs)
    exact = all(r.output.output_tokens == args.new_tokens for r in results)
    stats = process_stats()  # hf, and vllm's in-process core; a vllm core in its own process is not counted
    rate = len(jobs) / constrained_s
    print(f"  constrained (grounding grammar), all at once: {constrained_s:.2f}s  {rate:.2f} img/s")
    print(
        f"  ms per step (wall / {args.new_tokens} new tokens): free {1000 * free_s / args.new_tokens:.1f}  "
        f"constrained {1000 * constrained_s / args.new_tokens:.1f}  ratio {constrained_s / free_s:.2f}; "
        f"the mask adds {1000 * (constrained_s - free_s) / args.new_tokens:.1f} ms per step  "
        f"(grammar compiles {stats.compiles}, {1000 * stats.compile_seconds:.1f} ms)"
        + ("" if exact else "  (!) not every constrained job generated exactly its budget")
    )


def batch_size_totals() -> tuple[float, float]:
    """How many batches (hf generate calls, vllm steps) ran in this process, and their rows in all."""
    from varco.workers.metrics import BATCH_SIZE

    samples = {s.name: s.value for metric in BATCH_SIZE.collect() for s in metric.samples}
    return samples.get("varco_batch_size_count", 0.0), samples.get("varco_batch_size_sum", 0.0)


if __name__ == "__main__":  # vLLM's engine core may start processes that import this module
    sys.exit(main())
