from __future__ import annotations

import contextlib
import importlib
import ipaddress
import os
import socket
import sys
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

import pytest
from helpers import PUBLIC, ScriptedResolver

ROOT = Path(__file__).resolve().parents[1]


class _MutantAliases:
    """Import finder: `varco.<module>` is the mutated copy that mutmut imports as `<module>`.

    mutmut copies the modules it mutates to `mutants/` and names each mutant by file path
    (`tasks.tags.x_parse__mutmut_3`), while the project is imported under its one root
    (`varco.tasks.tags`). A finder, rather than aliasing once, makes the redirect hold however the
    modules import each other: a mutated `workers.fetch` importing `varco.workers.net.netguard` gets the
    mutated netguard too, whichever of the two is imported first.
    """

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        name = fullname.removeprefix("varco.")
        if name == fullname or name not in self.names:
            return None
        return ModuleSpec(fullname, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        return importlib.import_module(spec.name.removeprefix("varco."))

    def exec_module(self, module: ModuleType) -> None:
        """Already executed when mutmut's copy was imported under its own name."""


def _serve_mutants() -> None:
    """Under `make mutants`, serve every mutated module under its `varco.` name (see `_MutantAliases`).

    Installed before any test module imports the project.
    """
    if ROOT.name != "mutants":
        return
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    names = {path.removesuffix(".py").replace("/", ".") for path in config["tool"]["mutmut"]["source_paths"]}
    sys.meta_path.insert(0, _MutantAliases(names))


_serve_mutants()


# --- parallel runs (`make test`: pytest -n 2 --dist loadfile, with pytest-xdist) ------------------------
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Whole files, and groups of files that must share a process, as units of work (tests/xdist_scheduling.py)."""
    if config.getvalue("dist") != "loadfile":
        return None  # another --dist, asked for by hand: xdist's own
    from xdist_scheduling import FileOrGroupScheduling

    return FileOrGroupScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from varco.workers.devtools.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-varco")


@pytest.fixture(scope="session")
def script_book():
    """Scripted answers shared by the engines under test: tests add "{image_id}:{prompt}" keys."""
    from varco.workers.devtools.scripted import ScriptBook

    return ScriptBook({})


@pytest.fixture(scope="session")
def hf_engine(tiny_model_dir: Path, script_book) -> Iterator:
    from varco.workers.devtools.scripted import install
    from varco.workers.engines.hf import HFEngine

    engine = HFEngine(str(tiny_model_dir), max_batch_size=8, max_wait_ms=50)
    install(engine, script_book)
    yield engine.load()
    engine.stop()


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir: Path, script_book) -> Iterator:
    """vLLM's CPU build on the tiny model: in-process engine core, no compile step (start-up in seconds)."""
    from varco.workers.devtools.scripted import install
    from varco.workers.engines.vllm import VLLMEngine, configure_cpu_defaults

    os.environ.setdefault("VLLM_CACHE_ROOT", str(tiny_model_dir.parent / "vllm-cache"))
    configure_cpu_defaults()
    engine = VLLMEngine(
        str(tiny_model_dir),
        gpu_memory_utilization=0.1,
        max_num_seqs=16,
        max_model_len=8192,
        engine_args={"enforce_eager": True},
    )
    install(engine, script_book)
    with _flask_request_context():
        engine.load()
    yield engine
    engine.stop()


@contextlib.contextmanager
def _flask_request_context() -> Iterator[None]:
    """vLLM's CPU start-up scans every loaded module's globals with `hasattr`, which raises on Flask's
    `current_app`/`request` proxies outside a request. moto's server (other tests) loads Flask into this
    process; a worker process never has it. Inside a request context the proxies answer normally."""
    if "flask" not in sys.modules:
        yield
        return
    import flask

    with flask.Flask("vllm-start").test_request_context():
        yield


@pytest.fixture(params=["hf", "vllm"])
def engine(request: pytest.FixtureRequest):
    """Each engine backend in turn, behind the one interface."""
    return request.getfixturevalue(f"{request.param}_engine")


@pytest.fixture
def scripted_dns(monkeypatch: pytest.MonkeyPatch) -> ScriptedResolver:
    """Scripted DNS answers for test names, and PUBLIC counted as a public address (`is_global`) by all."""
    scripted = ScriptedResolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", scripted)
    real_is_global = ipaddress.IPv4Address.is_global
    monkeypatch.setattr(
        ipaddress.IPv4Address, "is_global", property(lambda ip: str(ip) == PUBLIC or real_is_global.fget(ip))
    )
    return scripted


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A private redis-server for one test module."""
    from varco.workers.devtools.local_redis import start_redis

    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def flushed_redis(module_redis):
    """A client of the module's redis-server, emptied before each test."""
    import redis

    client = redis.Redis.from_url(module_redis.url, decode_responses=True)
    client.flushdb()
    return client


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch):
    """Tracing on in this process, each finished span kept in memory (`spans.get_finished_spans()`).

    For unit tests of what a span holds; tests/integration/test_tracing.py checks what crosses processes
    over OTLP. Without the `otel` extra these tests skip."""
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from varco.tasks import tracing

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracing", tracing._Tracing(provider.get_tracer("test"), provider))
    monkeypatch.setattr(tracing, "_configured", True)
    return exporter
