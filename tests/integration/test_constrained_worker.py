"""Tag-constrained decoding through a real `varco worker` on each engine (issue 22, section 3).

The worker runs the random-weight tiny model with no scripted plugin (`VARCO_ENGINE_PLUGINS=""`), so it
answers what its weights make it say: mostly repairs. 100 OCR and 100 grounding jobs go in with
`constrained: true` and the same jobs with `constrained: false`. With the constraint every result obeys the
rules (tests/tag_invariants.py `broken_rules`), and its raw text, tokenised again, is a sentence of the
grammar; without it the repairs show, which is what proves the check can fail. A spelled-out tag decodes to
the same text as the special token, so it is not visible here: tests/workers/engines/test_tag_grammar.py
checks that at the token level. Budgets are small (48 tokens) to bound the time.

`make test` runs both workers, hf (~25 s on the 2-core machine) and vllm (105-250 s there: up to a minute of
start-up, then ~80 tokens/s through the worker on shared cores); `VARCO_CONSTRAINED_WORKER_ENGINES=hf` runs
one. The file is in the vLLM group of tests/xdist_scheduling.py, so no other vLLM loads beside it.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xgrammar as xgr
from conftest import running_worker
from PIL import Image
from tag_invariants import broken_rules
from transformers import AutoTokenizer

from varco.producer import Client
from varco.tasks.prompts import TaskType
from varco.tasks.schemas import JobResult
from varco.tasks.settings import settings_from_env
from varco.tasks.tag_grammar import shape_for_task
from varco.workers.devtools.local_redis import LocalRedis, free_port
from varco.workers.engines.tag_constraint import TagGrammars

JOBS = 100
BUDGET = 48
TASKS = ("ocr", "grounding")
ENGINES = os.environ.get("VARCO_CONSTRAINED_WORKER_ENGINES", "hf,vllm").split(",")
DBS = {"hf": 13, "vllm": 14}  # a Redis database each: no other test worker takes these jobs
VLLM_ENV = {
    "VARCO_GPU_MEMORY_UTILIZATION": "0.1",  # of RAM, on CPU
    "VARCO_MAX_NUM_SEQS": "16",
    "VARCO_VLLM_ENGINE_ARGS": '{"enforce_eager": true}',  # no compile step: starts in seconds
}


def png_uri(seed: int) -> str:
    """A small random image per job (its own answer): a data URI, so nothing is served."""
    pixels = np.random.default_rng(seed).integers(0, 256, (32 + seed % 5 * 16, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGES = [png_uri(seed) for seed in range(JOBS)]


@pytest.fixture(scope="module", params=ENGINES)
def free_client(
    request: pytest.FixtureRequest, worker_env: dict, redis_server: LocalRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Client]:
    """A client of a worker with no scripted answers, on the engine of the parameter."""
    engine = request.param
    env = {
        **worker_env,
        **(VLLM_ENV | {"VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache"))} if engine == "vllm" else {}),
        "VARCO_BROKER_URL": redis_server.url.rsplit("/", 1)[0] + f"/{DBS[engine]}",
        "VARCO_ENGINE": engine,
        "VARCO_ENGINE_PLUGINS": "",
        "VARCO_METRICS_PORT": str(free_port()),
        "VARCO_MAX_BATCH_SIZE": "16",
    }
    with running_worker(env, tmp_path_factory.mktemp(f"free-{engine}") / "worker.log"):
        client = Client(settings_from_env(env))
        yield client
        client.close()


@pytest.fixture(scope="module")
def grammars(tiny_model_dir: Path) -> tuple[object, TagGrammars]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    stops = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    return tokenizer, TagGrammars(tokenizer, len(tokenizer), stops)


def in_grammar(result: JobResult, grammars: tuple[object, TagGrammars]) -> bool:
    """The raw text, tokenised again (its tags become their special tokens), is a prefix of a sentence of its
    task's grammar, and a whole one (the stop token is accepted after it) when the model ended it."""
    tokenizer, compiled = grammars
    matcher = xgr.GrammarMatcher(compiled.get(shape_for_task(TaskType(result.task))))
    ids = tokenizer.encode(result.output.raw, add_special_tokens=False)  # type: ignore[attr-defined]
    return all(matcher.accept_token(t) for t in ids) and (
        result.finish_reason == "length" or matcher.accept_token(tokenizer.convert_tokens_to_ids("<|im_end|>"))  # type: ignore[attr-defined]
    )


def run_all(client: Client) -> dict[tuple[bool, str], list[JobResult]]:
    """Every job, constrained and free, submitted at once (the worker batches across both): results by
    (constrained, task), in image order."""
    keys = [(constrained, task) for constrained in (True, False) for task in TASKS]
    requests = [
        {"image_uri": image, "task": task, "max_new_tokens": BUDGET, "constrained": constrained}
        for constrained, task in keys
        for image in IMAGES
    ]
    results = [client.result(job_id, timeout=900) for job_id in client.submit_many(requests)]
    return {key: results[i * JOBS : (i + 1) * JOBS] for i, key in enumerate(keys)}


@pytest.mark.timeout(900)  # vllm on shared cores: past the suite's 300 s
def test_constrained_answers_always_parse_and_free_ones_show_repairs(free_client: Client, grammars) -> None:
    results = run_all(free_client)
    for task in TASKS:
        for result in results[True, task]:
            assert broken_rules(result.output, result.finish_reason) == [], (task, result.output)
            assert in_grammar(result, grammars), (task, result.output.raw)
        assert any(r.finish_reason == "stop" for r in results[True, task]), task  # the EOS rule is exercised too
    assert any(r.output.ocr for r in results[True, "ocr"])  # OCR items do appear, with their boxes

    for task in TASKS:
        repaired = [r for r in results[False, task] if broken_rules(r.output, r.finish_reason)]
        assert len(repaired) > JOBS // 4, (task, len(repaired))
