"""Engine figures on this CPU with the tiny model: build time, load time, batched vs one-at-a-time.

Run: .venv/bin/python bench/engine_cpu.py [--images 8] [--new-tokens 32]
Prints figures; nothing here is asserted (speed targets belong in bench/, not in tests).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from varco.workers.engine import Engine, GenerationRequest
from varco.workers.tiny_model import make_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        make_tiny_model(tmp)
        build_s = time.perf_counter() - started
        engine = Engine(tmp).load()
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(args.images)]
        requests = [GenerationRequest(im, "Describe this image.", args.new_tokens) for im in images]
        engine.generate(requests[:1])  # warm-up
        batched, single = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            engine.generate(requests)
            batched.append(time.perf_counter() - t)
            t = time.perf_counter()
            for r in requests:
                engine.generate([r])
            single.append(time.perf_counter() - t)
    b, s = statistics.median(batched), statistics.median(single)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, tiny model built in {build_s:.2f}s, "
        f"loaded in {engine.load_seconds:.2f}s"
    )
    print(f"{args.images} images 640x480, {args.new_tokens} new tokens each, median of {args.repeats}:")
    print(f"  one batched generate: {b:.3f}s  ({args.images / b:.1f} img/s)")
    print(f"  one at a time:        {s:.3f}s  ({args.images / s:.1f} img/s)")


if __name__ == "__main__":
    main()
