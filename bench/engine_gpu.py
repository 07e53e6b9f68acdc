"""Full-size engine benchmark: VARCO-VISION-14B shapes with random weights, bf16, on one GPU.

Builds the real architecture in code (Qwen2.5-14B text model: hidden 5120, 48 layers, 40 heads /
8 KV heads, MLP 13824, vocab 152064; SigLIP-so400m-patch14-384 vision tower; anyres_max_9 over the
384…2304 pinpoints) directly on the GPU, then times the engine on N images of 640x480 with a fixed
number of forced new tokens: one at a time versus batched. Prints img/s and peak GPU memory.

Run on a GPU machine:   python bench/engine_gpu.py [--images 16] [--new-tokens 128] [--batch 16]
Smoke-test on a CPU:    python bench/engine_gpu.py --shrink --images 4 --new-tokens 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from varco.workers.engine import Engine, GenerationRequest, attention_implementation
from varco.workers.tiny_model import CHAT_TEMPLATE, build_tokenizer

REAL_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]


def build(shrink: bool, device: str) -> Engine:
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tokenizer = build_tokenizer()
    text = Qwen2Config(
        vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1_000_000.0,
        tie_word_embeddings=False,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
        image_size=384, patch_size=14, vision_use_head=False,
    )  # fmt: skip
    if shrink:  # same code path, CPU-sized
        text.hidden_size, text.intermediate_size, text.num_hidden_layers = 64, 128, 2
        text.num_attention_heads, text.num_key_value_heads = 4, 2
        vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads = (
            32, 64, 2, 2,
        )  # fmt: skip
    config = LlavaOnevisionConfig(
        text_config=text, vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=REAL_PINPOINTS, vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    config._attn_implementation = attention_implementation(device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype).eval()
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 384, "width": 384},
                                                     image_grid_pinpoints=REAL_PINPOINTS),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}),
        num_image_tokens=(384 // 14) ** 2, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE, vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    engine = Engine("random-varco-14b-shapes", device=device)
    # The same fields Engine.load() sets after from_pretrained; the loading path itself is tested on the tiny model.
    engine.model, engine.processor, engine.dtype = model, processor, dtype
    engine.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    engine.stop_ids = {engine.eos_token_id, tokenizer.pad_token_id}
    return engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shrink", action="store_true", help="tiny dimensions, for a CPU smoke test")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    engine = build(args.shrink, device)
    params = sum(p.numel() for p in engine.model.parameters())
    built_s = time.perf_counter() - started
    attention = engine.model.config._attn_implementation
    print(
        f"built {params / 1e9:.2f} B parameters on {device} ({engine.dtype}) in {built_s:.1f}s, attention {attention}"
    )
    rng = np.random.default_rng(0)
    script = "a" * args.new_tokens  # forced: every request generates exactly new_tokens tokens
    requests = [
        GenerationRequest(Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)),
                          "<gro>\nDescribe the image in detail.", args.new_tokens, script=script)
        for _ in range(args.images)
    ]  # fmt: skip
    engine.generate(requests[:2])  # warm-up

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    single = timed(lambda: [engine.generate([r]) for r in requests])
    peak_single = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batched = timed(
        lambda: [engine.generate(requests[i : i + args.batch]) for i in range(0, len(requests), args.batch)]
    )
    peak_batched = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    out = engine.generate(requests[:1])[0]
    print(f"{args.images} images 640x480, {args.new_tokens} forced new tokens, prompt {out.prompt_tokens} tokens")
    print(f"  one at a time: {single:.2f}s  {args.images / single:.2f} img/s  peak {peak_single:.1f} GiB")
    print(f"  batch {args.batch}:      {batched:.2f}s  {args.images / batched:.2f} img/s  peak {peak_batched:.1f} GiB")
    if device == "cuda":
        print(f"  GPU: {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
