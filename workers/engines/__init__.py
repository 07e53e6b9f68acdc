"""Engine backends behind one interface (`base.EngineBackend`): hf (batched generate), vllm (continuous batching).

`create_engine(settings)` picks one by `VARCO_ENGINE` (`auto`: vllm when it is importable and CUDA
is available, else hf), runs the plugins named in `VARCO_ENGINE_PLUGINS` on it, and returns it
unloaded; the worker loads it before taking its first message.
"""

from __future__ import annotations

import importlib
import importlib.util

from varco.tasks.settings import Settings
from varco.workers.engines.base import EngineBackend


def resolve_backend(name: str) -> str:
    if name != "auto":
        return name
    if importlib.util.find_spec("vllm") is None:
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def load_object(spec: str) -> object:
    """ "package.module:attribute" -> the attribute."""
    module, _, attribute = spec.partition(":")
    if not module or not attribute:
        raise ValueError(f"expected 'module:attribute', not {spec!r}")
    return getattr(importlib.import_module(module), attribute)


def create_engine(settings: Settings) -> EngineBackend:
    backend = resolve_backend(settings.engine)
    engine: EngineBackend
    if backend == "vllm":
        from varco.workers.engines.vllm import VLLMEngine, configure_cpu_defaults

        configure_cpu_defaults()
        engine = VLLMEngine(
            settings.model,
            dtype=settings.dtype,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_num_seqs=settings.max_num_seqs,
            max_model_len=settings.max_model_len,
            engine_args=settings.vllm_engine_args,
        )
    else:
        from varco.workers.engines.hf import HFEngine

        engine = HFEngine(
            settings.model,
            dtype=settings.dtype,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_batch_tokens=settings.max_batch_tokens,
        )
    for spec in settings.engine_plugins:
        plugin = load_object(spec)
        plugin(engine)  # type: ignore[operator]
    return engine
