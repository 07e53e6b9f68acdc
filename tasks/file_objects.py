"""Batch API files as objects in the result store (`{VARCO_RESULT_STORE}files/{name}`), streamed both ways.

A file is written from an iterator of chunks and read back as one, so neither the gateway nor a batch
runner ever holds a whole file (up to 200 MB) in memory: S3 gets a multipart upload (boto3's managed
transfer), a directory a temporary file renamed into place. Reads may start at a byte offset, which is how
a batch runner resumes expanding its input where its checkpoint says.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import unquote, urlsplit

from varco.tasks.settings import Settings

CHUNK_BYTES = 1024 * 1024


class FileObjects(Protocol):
    def uri_for(self, name: str) -> str: ...
    def write(self, name: str, chunks: Iterable[bytes]) -> str:
        """Store `name` from `chunks`; returns its URI. A reader never sees half an object."""

    def read(self, uri: str, offset: int = 0) -> Iterator[bytes]:
        """The object's bytes from `offset`, in chunks (also any `s3://` URI the settings can reach)."""

    def delete(self, uri: str) -> None: ...


class _ChunkReader:
    """A file-like view of an iterator of chunks, for boto3's upload_fileobj (reads in its own sizes)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            size = len(self._buffer)
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


class DirectoryFiles:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix + "files/"
        self.root = Path(unquote(urlsplit(self.prefix).path))

    def uri_for(self, name: str) -> str:
        return self.prefix + name

    def write(self, name: str, chunks: Iterable[bytes]) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with tmp.open("wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
            os.replace(tmp, self.root / name)
        finally:
            tmp.unlink(missing_ok=True)
        return self.uri_for(name)

    def read(self, uri: str, offset: int = 0) -> Iterator[bytes]:
        if uri.startswith("s3://"):
            raise ValueError(f"{uri}: the result store is a directory; s3:// input needs VARCO_RESULT_STORE on S3")
        with Path(unquote(urlsplit(uri).path)).open("rb") as handle:
            handle.seek(offset)
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk

    def delete(self, uri: str) -> None:
        Path(unquote(urlsplit(uri).path)).unlink(missing_ok=True)


class S3Files:
    def __init__(self, prefix: str, endpoint_url: str | None) -> None:
        import boto3  # lazily: a directory store needs no boto3
        from botocore.config import Config

        self.prefix = prefix + "files/"
        parts = urlsplit(self.prefix)
        self.bucket, self.key_prefix = parts.netloc, parts.path.lstrip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url,
                                   config=Config(retries={"max_attempts": 5, "mode": "standard"}))  # fmt: skip

    def uri_for(self, name: str) -> str:
        return self.prefix + name

    def write(self, name: str, chunks: Iterable[bytes]) -> str:
        reader: IO[bytes] = _ChunkReader(chunks)  # type: ignore[assignment]
        self.client.upload_fileobj(reader, self.bucket, self.key_prefix + name)  # multipart past 8 MB
        return self.uri_for(name)

    def read(self, uri: str, offset: int = 0) -> Iterator[bytes]:
        parts = urlsplit(uri)
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            body = self.client.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"), **extra)["Body"]
        except self.client.exceptions.ClientError as exc:
            if offset and exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return  # the offset is the end of the object
            raise
        with contextlib.closing(body):
            yield from body.iter_chunks(CHUNK_BYTES)

    def delete(self, uri: str) -> None:
        parts = urlsplit(uri)
        self.client.delete_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))


def file_objects(settings: Settings) -> FileObjects:
    if settings.result_store.startswith("s3://"):
        return S3Files(settings.result_store, settings.s3_endpoint_url)
    return DirectoryFiles(settings.result_store)


def lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a stream of chunks, each with its end of line, one chunk in memory at a time."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        for line in whole:
            yield line + b"\n"
    if rest:
        yield rest
