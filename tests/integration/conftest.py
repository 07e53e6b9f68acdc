"""Integration fixtures: a private redis-server, a moto S3 server over HTTP, local HTTP servers,
and a worker started through the `varco worker` CLI as a subprocess. All on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The integration suite runs real workers: it needs the `worker` extra (torch, Pillow) and the test
# tools. Without them it is skipped with the reason, before anything below imports them.
for _needed in ("torch", "PIL", "boto3", "moto"):
    pytest.importorskip(_needed, reason=f"the integration tests need {_needed} (pip install '.[worker,test]')")

import boto3  # noqa: E402
import httpx  # noqa: E402
from helpers import VARCO_CLI, ServedFiles, WebhookReceiver, card_output  # noqa: E402
from images import jpeg_rotated, png  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from varco.producer import Client  # noqa: E402
from varco.tasks.settings import Settings, settings_from_env  # noqa: E402
from varco.workers.devtools.local_redis import LocalRedis, free_port, start_redis  # noqa: E402
from varco.workers.devtools.local_worker import local_worker  # noqa: E402
from varco.workers.devtools.scripted import SCRIPTED_PLUGIN, SCRIPTS_FILE  # noqa: E402

SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLXZhcmNvLXF1ZXVl"
RESULTS_BUCKET, IMAGES_BUCKET = "varco-results", "varco-images"
CAT = png(640, 480, (180, 40, 40))
SIGN = png(800, 400, (30, 110, 60))
LONG = png(48, 48, (1, 2, 3))  # scripted with a very long answer: the job to cancel while running
MEDIUM = png(40, 40, (4, 5, 6))  # scripted with ~1500 tokens: in flight for a few seconds
ROTATED = jpeg_rotated(300, 200)
LONG_ANSWER_TOKENS = 6000

SCRIPTS = {
    (CAT, "caption"): "A red picture.",
    (CAT, "grounding"): card_output("grounding"),
    (CAT, "referring"): card_output("referring"),
    (CAT, "vqa"): "It is <obj>red</obj><bbox>0.0, 0.0, 1.0, 1.0</bbox>.",
    (CAT, "ocr"): card_output("ocr"),
    (SIGN, "ocr"): card_output("ocr"),
    (LONG, "caption"): "a" * LONG_ANSWER_TOKENS,
    (MEDIUM, "caption"): "b" * 1500,
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_scripts(model_dir: Path) -> None:
    """SCRIPTS where the scripted engine plugin reads them: a file beside the model."""
    scripts = {f"{sha(data)}:{task}": text for (data, task), text in SCRIPTS.items()}
    (model_dir / SCRIPTS_FILE).write_text(json.dumps(scripts), encoding="utf-8")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=url)
    for bucket in (RESULTS_BUCKET, IMAGES_BUCKET):
        s3.create_bucket(Bucket=bucket)
    yield url
    server.stop()


@pytest.fixture(scope="session")
def s3(s3_server: str):
    return boto3.client("s3", endpoint_url=s3_server)


@pytest.fixture(scope="session")
def http_files() -> Iterator[ServedFiles]:
    served = ServedFiles()
    served.add("/cat.png", CAT, headers={"content-type": "image/png"})
    served.add("/rotated.jpg", ROTATED)
    served.add("/not-an-image.txt", b"hello, I am text")
    served.add("/redirect", status=302, headers={"location": "/cat.png"})
    yield served
    served.close()


@pytest.fixture(scope="session")
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.close()


@pytest.fixture(scope="session")
def file_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "sign.png").write_bytes(SIGN)
    (root / "cat.png").write_bytes(CAT)
    return root


@pytest.fixture(scope="session")
def worker_env(redis_server: LocalRedis, s3_server: str, s3, tiny_model_dir: Path, file_root: Path) -> dict[str, str]:
    write_scripts(tiny_model_dir)
    s3.put_object(Bucket=IMAGES_BUCKET, Key="in/sign.png", Body=SIGN)
    s3.put_object(Bucket=IMAGES_BUCKET, Key="in/cat.png", Body=CAT)
    return {
        "VARCO_BROKER_URL": redis_server.url,
        "VARCO_RESULT_STORE": f"s3://{RESULTS_BUCKET}/jobs/",
        "VARCO_S3_ENDPOINT_URL": s3_server,
        "VARCO_MODEL": str(tiny_model_dir),
        "VARCO_ENGINE_PLUGINS": SCRIPTED_PLUGIN,
        "VARCO_METRICS_PORT": str(free_port()),  # never the default 9808 of a real node on this machine
        "VARCO_FILE_ROOT": str(file_root),
        "VARCO_S3_BUCKETS": IMAGES_BUCKET,  # s3:// images may come from this bucket only (not the results one)
        "VARCO_CALLBACK_TIMEOUT_S": "3",  # one webhook attempt, all of it (test_webhook_starvation)
        "VARCO_ALLOW_PRIVATE_URLS": "true",  # every test server is on loopback
        "VARCO_CALLBACK_SECRET": SECRET,
        "VARCO_MAX_ATTEMPTS": "3",
        "VARCO_MAX_BATCH_SIZE": "8",
        "VARCO_MAX_WAIT_MS": "30",
        "VARCO_MAX_NEW_TOKENS": "16",
        "VARCO_MAX_DATA_URI_BYTES": "65536",
        "VARCO_STATUS_TTL": "3600",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="session")
def settings(worker_env: dict[str, str]) -> Settings:
    return settings_from_env(worker_env)


@contextlib.contextmanager
def running_worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """`varco worker --gpus cpu` as a subprocess; SIGTERM (warm shutdown) when the block ends."""
    try:
        with local_worker(env, log_path) as process:
            yield process
    finally:
        if os.environ.get("VARCO_SHOW_WORKER_LOG"):
            print(log_path.read_text())


@pytest.fixture(scope="session")
def worker(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    with running_worker(worker_env, tmp_path_factory.mktemp("logs") / "worker.log") as process:
        yield process


@pytest.fixture(scope="session")
def client(settings: Settings, worker: subprocess.Popen) -> Iterator[Client]:
    c = Client(settings)
    yield c
    c.close()


def submit_every_task(client: Client, url: str) -> dict[str, str]:
    """One job of each task type on one image; task -> job id."""
    return {
        "caption": client.submit(url, "caption", metadata={"user": 7}),
        "grounding": client.submit(url, "grounding", max_new_tokens=1024),
        "referring": client.submit(url, "referring", region=[0.039, 0.138, 0.283, 0.257], label="이 물건",
                                   prompt="은 어떻게 쓰는거야?", max_new_tokens=1024),
        "ocr": client.submit(url, "ocr", max_new_tokens=1024),
        "vqa": client.submit(url, "vqa", prompt="What colour is it?"),
    }  # fmt: skip


def wait_for_state(client: Client, job_id: str, states: set[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.status(job_id).state.value in states:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}; it is {client.status(job_id).state.value}")


def node_metric(env: dict[str, str], name: str, **labels: str) -> float:
    """A sample of the worker node's /metrics whose labels include `labels` (0 when absent)."""
    deadline = time.monotonic() + 120
    while True:  # the node's endpoint comes up with the worker
        try:
            text = httpx.get(f"http://127.0.0.1:{env['VARCO_METRICS_PORT']}/metrics", timeout=5).text
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the worker node's /metrics never answered"
            time.sleep(0.2)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def forced_tokens(env: dict[str, str], image: bytes) -> int:
    """Tokens the scripted plugin has forced for this image in the worker node (its /metrics)."""
    return int(node_metric(env, "varco_scripted_tokens_total", image_id=sha(image)))


# --- the HTTP gateway ---------------------------------------------------------------------------
GATEWAY_KEYS = ("key-alice-0123456789", "key-bob-9876543210")


@contextlib.contextmanager
def running_gateway(env: dict[str, str], log_path: Path, *args: str) -> Iterator[str]:
    """`varco gateway` as a subprocess on a free port; yields its base URL once /livez answers."""
    with gateway_process(env, log_path, *args) as (base, _):
        yield base


@contextlib.contextmanager
def gateway_process(env: dict[str, str], log_path: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`running_gateway`, yielding the process too (its pid, for its memory)."""
    import httpx

    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*VARCO_CLI, "gateway", "--host", "127.0.0.1", "--port", str(port), *args],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"gateway exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"gateway never answered: {log_path.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/livez", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def gateway_env(worker_env: dict[str, str]) -> dict[str, str]:
    return {**worker_env, "VARCO_API_KEYS": ",".join(GATEWAY_KEYS)}


@pytest.fixture(scope="session")
def gateway(gateway_env: dict[str, str], worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway's base URL, with a worker behind it; keys GATEWAY_KEYS."""
    with running_gateway(gateway_env, tmp_path_factory.mktemp("logs") / "gateway.log") as base:
        yield base
