"""Chat completion latency against `Client.submit` + `result`, and time to first streamed chunk against
time to the whole answer, in one run.

Run: .venv/bin/python bench/openai_latency.py [--runs 20] [--tokens 256]
Starts a private redis-server, one `varco worker --gpus cpu` on the tiny offline model with a scripted
answer longer than the budget (so every answer is exactly --tokens tokens, finish_reason `length`), and
`varco gateway`, on free ports. Each way of asking runs the same caption job --runs times, one at a time:
`Client.submit` + `Client.result` in this process; `chat.completions.create` through the `openai` SDK;
the same with `stream=True` (time to the first content chunk, and to `[DONE]`). A warm-up job runs first.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
from plain_png import plain_png

from varco.gateway.openai_mapping import SERVED_ALIAS
from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.devtools.local_worker import VARCO_CLI, local_worker
from varco.workers.devtools.scripted import SCRIPTED_PLUGIN, SCRIPTS_FILE
from varco.workers.devtools.tiny_model import make_tiny_model

KEY = "bench-key-0123456789abcdef"


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


@contextlib.contextmanager
def gateway(env: dict[str, str], log: Path) -> Iterator[str]:
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([*VARCO_CLI, "gateway", "--host", "127.0.0.1", "--port", str(port)],
                                   env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/livez", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def timed(call: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis = start_redis(root)
        image = plain_png((64, 64))
        (root / "images").mkdir()
        (root / "images" / "a.png").write_bytes(image)
        uri = (root / "images" / "a.png").as_uri()
        model = make_tiny_model(root / "model")
        scripts = {f"{hashlib.sha256(image).hexdigest()}:caption": "a" * (args.tokens * 4)}
        (model / SCRIPTS_FILE).write_text(json.dumps(scripts), encoding="utf-8")
        env = {
            "VARCO_BROKER_URL": redis.url,
            "VARCO_MODEL": str(model),
            "VARCO_ENGINE_PLUGINS": SCRIPTED_PLUGIN,
            "VARCO_RESULT_STORE": (root / "results").as_uri() + "/",
            "VARCO_FILE_ROOT": str(root / "images"),
            "VARCO_API_KEYS": KEY,
        }
        # The gateway refuses file:// images (its callers do not own the worker's disk): all ask by data URI.
        data_uri = "data:image/png;base64," + base64.b64encode(image).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri}}]}]
        with local_worker(env, root / "worker.log", "--no-callbacks"), gateway(env, root / "gateway.log") as base:
            client = Client(settings_from_env(env))
            sdk = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=600)
            client.result(client.submit(uri, "caption", max_new_tokens=4), timeout=300)  # warm-up: model loaded

            def direct() -> None:
                client.result(client.submit(data_uri, "caption", max_new_tokens=args.tokens), timeout=600)

            def chat() -> None:
                answer = sdk.chat.completions.create(model=SERVED_ALIAS, messages=messages, max_tokens=args.tokens)
                assert answer.usage is not None and answer.usage.completion_tokens == args.tokens

            firsts: list[float] = []

            def streamed() -> None:
                start, first = time.perf_counter(), None
                for chunk in sdk.chat.completions.create(model=SERVED_ALIAS, messages=messages,
                                                         max_tokens=args.tokens, stream=True):  # fmt: skip
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - start
                assert first is not None
                firsts.append(first)

            rows = [
                ("Client.submit + result", timed(direct, args.runs)),
                ("chat.completions.create", timed(chat, args.runs)),
                ("stream=True, to [DONE]", timed(streamed, args.runs)),
                ("stream=True, first chunk", firsts),
            ]
            client.close()
        redis.stop()
    print(f"{args.runs} runs each, one at a time; caption of a 64x64 PNG, {args.tokens} output tokens; "
          "tiny model, one CPU worker")  # fmt: skip
    print("| path | p50 ms | p95 ms | mean ms |\n| --- | --- | --- | --- |")
    for name, values in rows:
        print(f"| {name} | {p(values, 50):.0f} | {p(values, 95):.0f} | {statistics.fmean(values) * 1000:.0f} |")


if __name__ == "__main__":
    main()
