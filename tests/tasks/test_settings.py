from __future__ import annotations

import os
from pathlib import Path

import pytest

from varco.tasks.settings import Settings


def test_every_design_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "VARCO_BROKER_URL": "redis://10.0.0.5:6380/2",
        "VARCO_RESULT_STORE": "s3://results/varco",
        "VARCO_S3_ENDPOINT_URL": "http://minio:9000",
        "VARCO_MODEL": "/models/varco",
        "VARCO_DTYPE": "float16",
        "VARCO_MAX_BATCH_SIZE": "16",
        "VARCO_MAX_WAIT_MS": "50",
        "VARCO_CALLBACK_SECRET": "whsec_c2VjcmV0",
        "VARCO_ALLOW_PRIVATE_URLS": "true",
        "VARCO_FILE_ROOT": "/srv/images",
        "VARCO_MAX_IMAGE_BYTES": "1000",
        "VARCO_MAX_IMAGE_PIXELS": "2000",
        "VARCO_VISIBILITY_TIMEOUT": "7200",
        "VARCO_MAX_ATTEMPTS": "5",
        "VARCO_STATUS_TTL": "600",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert s.broker_url == "redis://10.0.0.5:6380/2"
    assert s.result_store == "s3://results/varco/"  # normalised to a prefix
    assert s.s3_endpoint_url == "http://minio:9000"
    assert (s.model, s.dtype, s.max_batch_size, s.max_wait_ms) == ("/models/varco", "float16", 16, 50)
    assert s.callback_secret is not None and s.callback_secret.get_secret_value() == "whsec_c2VjcmV0"
    assert s.allow_private_urls is True and str(s.file_root) == "/srv/images"
    assert (s.max_image_bytes, s.max_image_pixels) == (1000, 2000)
    assert (s.visibility_timeout, s.max_attempts, s.status_ttl) == (7200, 5, 600)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # The documented defaults, whatever VARCO_* variables the shell running the tests has.
    for name in [n for n in os.environ if n.upper().startswith("VARCO_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    s = Settings(_env_file=None)
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.model == "NCSOFT/VARCO-VISION-14B-HF"
    assert s.result_store.startswith("file:///") and s.result_store.endswith("/")
    assert s.allow_private_urls is False
    assert s.result_store == (Path.home() / ".local/share/varco-queue/results").as_uri() + "/"
    assert (s.max_attempts, s.status_ttl, s.max_new_tokens) == (3, 604800, 1024)


def test_bad_store_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VARCO_RESULT_STORE", "ftp://x/")
    with pytest.raises(ValueError, match="VARCO_RESULT_STORE"):
        Settings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VARCO_RESULT_STORE": "file:///srv/varco/results/", "VARCO_FILE_ROOT": "/srv/varco"}, "VARCO_FILE_ROOT"),
        ({"VARCO_RESULT_STORE": "file:///srv/images/", "VARCO_FILE_ROOT": "/srv/images"}, "VARCO_FILE_ROOT"),
        ({"VARCO_RESULT_STORE": "file:///srv/x/../varco/", "VARCO_FILE_ROOT": "/srv/varco/"}, "VARCO_FILE_ROOT"),
        ({"VARCO_RESULT_STORE": "s3://results/jobs/", "VARCO_S3_BUCKETS": "images,results"}, "VARCO_S3_BUCKETS"),
        ({"VARCO_RESULT_STORE": "s3://results/jobs/", "VARCO_S3_BUCKETS": "*"}, "VARCO_S3_BUCKETS"),
    ],
)
def test_image_sources_may_not_cover_the_result_store(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    # A key that knows another job's id would read that job's kept image (`{id}.image`) into its own job.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=f"{message} .* covers|{message} .* holds the result store"):
        Settings()


def test_image_sources_beside_the_result_store_are_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VARCO_RESULT_STORE", "s3://results/jobs/")
    monkeypatch.setenv("VARCO_S3_BUCKETS", "images,results-archive")
    monkeypatch.setenv("VARCO_FILE_ROOT", "/srv/images")
    assert Settings().s3_buckets == ["images", "results-archive"]
    monkeypatch.setenv("VARCO_RESULT_STORE", "file:///srv/images-results/")
    assert Settings().file_root == Path("/srv/images")
