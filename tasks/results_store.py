"""Result store: `{VARCO_RESULT_STORE}{job_id}.json` on S3-compatible storage or a local directory.

Both sides use it: workers write results, `Client.result()` reads them. Writing the same job twice
writes the same key, so a redelivered job that completes again changes nothing for readers. Beside a
result the worker keeps the image bytes it fetched, `{job_id}.image` (VARCO_KEEP_IMAGES), for overlays,
and the gateway stores each overlay it draws, `{job_id}.overlay.png`, so it draws one once.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from varco.tasks.job_ids import check_job_id
from varco.tasks.settings import Settings

OVERLAY_SUFFIX = ".overlay.png"


class ResultStore(Protocol):
    prefix: str

    def uri_for(self, job_id: str) -> str: ...
    def write(self, job_id: str, data: bytes) -> str: ...
    def write_image(self, job_id: str, data: bytes) -> str: ...  # a job's fetched image bytes, beside its result
    def write_overlay(self, job_id: str, data: bytes) -> str: ...  # the gateway's drawn overlay, beside it
    def overlay_uri(self, job_id: str) -> str: ...
    def read(self, uri: str) -> bytes: ...
    def delete(self, job_id: str) -> None:
        """Remove a job's result if there is one (a result written for a job that ended otherwise)."""

    def probe(self, name: str) -> None:
        """Write and delete a small object: raises unless the store is reachable and writable."""


class FileResultStore:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.root = Path(unquote(urlsplit(prefix).path))
        self._root_made = False

    def uri_for(self, job_id: str) -> str:
        return f"{self.prefix}{check_job_id(job_id)}.json"

    def write(self, job_id: str, data: bytes) -> str:
        self._write(f"{check_job_id(job_id)}.json", data)
        return self.uri_for(job_id)

    def write_image(self, job_id: str, data: bytes) -> str:
        # a malformed id never becomes a path outside the result directory
        self._write(f"{check_job_id(job_id)}.image", data)
        return f"{self.prefix}{job_id}.image"

    def overlay_uri(self, job_id: str) -> str:
        return f"{self.prefix}{check_job_id(job_id)}{OVERLAY_SUFFIX}"

    def write_overlay(self, job_id: str, data: bytes) -> str:
        self._write(f"{check_job_id(job_id)}{OVERLAY_SUFFIX}", data)
        return self.overlay_uri(job_id)

    def _write(self, name: str, data: bytes) -> None:
        if not self._root_made:  # once per process, not once per job
            self.root.mkdir(parents=True, exist_ok=True)
            self._root_made = True
        target = self.root / name
        # Write-then-rename: a reader never sees half a result. The temporary name is unique per
        # writer (process, thread), so two deliveries of one job never share it.
        tmp = self.root / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:  # the directory was removed under us: make it again
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)

    def read(self, uri: str) -> bytes:
        return Path(unquote(urlsplit(uri).path)).read_bytes()

    def delete(self, job_id: str) -> None:
        (self.root / f"{job_id}.json").unlink(missing_ok=True)

    def probe(self, name: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / name
        path.write_bytes(b"probe")
        path.unlink()


class S3ResultStore:
    def __init__(self, prefix: str, endpoint_url: str | None) -> None:
        import boto3  # lazily: a file store needs no boto3
        from botocore.config import Config

        self.prefix = prefix
        parts = urlsplit(prefix)
        self.bucket, self.key_prefix = parts.netloc, parts.path.lstrip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30),
        )

    def uri_for(self, job_id: str) -> str:
        return f"{self.prefix}{check_job_id(job_id)}.json"

    def write(self, job_id: str, data: bytes) -> str:
        key = f"{self.key_prefix}{check_job_id(job_id)}.json"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/json")
        return self.uri_for(job_id)

    def write_image(self, job_id: str, data: bytes) -> str:
        key = f"{self.key_prefix}{check_job_id(job_id)}.image"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/octet-stream")
        return f"{self.prefix}{job_id}.image"

    def overlay_uri(self, job_id: str) -> str:
        return f"{self.prefix}{check_job_id(job_id)}{OVERLAY_SUFFIX}"

    def write_overlay(self, job_id: str, data: bytes) -> str:
        key = f"{self.key_prefix}{check_job_id(job_id)}{OVERLAY_SUFFIX}"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="image/png")
        return self.overlay_uri(job_id)

    def read(self, uri: str) -> bytes:
        parts = urlsplit(uri)
        return self.client.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))["Body"].read()

    def delete(self, job_id: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=f"{self.key_prefix}{job_id}.json")

    def probe(self, name: str) -> None:
        key = f"{self.key_prefix}{name}"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=b"probe")
        self.client.delete_object(Bucket=self.bucket, Key=key)


def result_store(settings: Settings) -> ResultStore:
    if settings.result_store.startswith("s3://"):
        return S3ResultStore(settings.result_store, settings.s3_endpoint_url)
    return FileResultStore(settings.result_store)
