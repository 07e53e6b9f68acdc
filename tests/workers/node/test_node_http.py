"""The node's HTTP endpoint: bound where VARCO_METRICS_HOST says, with process_* metrics of every process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import free_port, start_redis
from varco.workers.node.supervisor import Child, _serve_endpoint


@pytest.fixture
def sleeper() -> Iterator[Child]:
    child = Child("cpu0@test", [sys.executable, "-c", "import time; time.sleep(60)"], {})
    child.process = subprocess.Popen(child.argv)
    yield child
    child.process.kill()
    child.process.wait()


def test_the_endpoint_binds_the_metrics_host_and_exports_each_process(tmp_path: Path, sleeper: Child) -> None:
    with start_redis(tmp_path) as redis_server:
        port = free_port()
        settings = Settings(broker_url=redis_server.url, metrics_host="127.0.0.1", metrics_port=port, _env_file=None)
        state_dir = tmp_path / "state"
        state_dir.mkdir()
        server = _serve_endpoint(settings, [sleeper], state_dir, ["varco"], callbacks=False)
        assert server is not None
        try:
            assert server.server_address == ("127.0.0.1", port)  # not 0.0.0.0: only this host reaches it
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        finally:
            server.shutdown()
            server.server_close()
    memory = {
        s.labels["process"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "process_resident_memory_bytes"
    }
    assert set(memory) == {"supervisor", "cpu0@test"} and all(v > 0 for v in memory.values())
    assert 'process_start_time_seconds{process="cpu0@test"}' in text
