"""The Batch API's operations, shared by `Client`, the CLI and the gateway: store an input file (streamed, with
its limits), create a batch, read and cancel it, read a file's content. The runner that executes batches is
`batch_runner.py`, in each `varco worker` node's callback process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from varco.tasks.batches import BatchRecord, BatchStore, FileRecord, new_batch_id, new_file_id, now
from varco.tasks.file_objects import CHUNK_BYTES, FileObjects, file_objects
from varco.tasks.requests import InvalidRequest
from varco.tasks.settings import Settings
from varco.tasks.tenants import check_tenant

from .batch_lines import ENDPOINT

PURPOSES = ("batch",)  # what may be uploaded; outputs are `batch_output`
_WINDOW = re.compile(r"(?P<n>[1-9][0-9]*)(?P<unit>[smh])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW_S = 24 * 3600


class BatchNotFound(KeyError):
    """No such batch or file, or one that belongs to another owner."""


def window_seconds(window: str) -> int:
    """`24h` (OpenAI's only window), or a shorter one like `30m` or `90s`; InvalidRequest otherwise."""
    match = _WINDOW.fullmatch(window) if isinstance(window, str) else None
    seconds = int(match["n"]) * _UNIT_S[match["unit"]] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise InvalidRequest(f"completion_window must be '24h' (or shorter, like '1h'); got {window!r}",
                             field="completion_window")  # fmt: skip
    return seconds


class Batches:
    def __init__(self, settings: Settings, store: BatchStore, objects: FileObjects | None = None) -> None:
        self.settings, self.store = settings, store
        self._objects = objects

    @property
    def objects(self) -> FileObjects:
        if self._objects is None:
            self._objects = file_objects(self.settings)
        return self._objects

    # --- files ----------------------------------------------------------------------------
    def upload(self, chunks: Iterable[bytes], filename: str, purpose: str = "batch", owner: str = "") -> FileRecord:
        """Store an input file from a stream of chunks: at most VARCO_BATCH_MAX_FILE_BYTES and
        VARCO_BATCH_MAX_LINES, else InvalidRequest (nothing stored)."""
        if purpose not in PURPOSES:
            raise InvalidRequest(f"purpose must be one of {list(PURPOSES)}, got {purpose!r}", field="purpose")
        file_id = new_file_id()
        size = newlines = 0
        last = b"\n"

        def counted() -> Iterator[bytes]:
            nonlocal size, newlines, last
            for chunk in chunks:
                size += len(chunk)
                newlines += chunk.count(b"\n")
                if size > self.settings.batch_max_file_bytes:
                    raise InvalidRequest(f"the file is over {self.settings.batch_max_file_bytes} bytes "
                                         "(VARCO_BATCH_MAX_FILE_BYTES)", field="file")  # fmt: skip
                if newlines > self.settings.batch_max_lines:
                    raise InvalidRequest(f"the file has over {self.settings.batch_max_lines} lines "
                                         "(VARCO_BATCH_MAX_LINES)", field="file")  # fmt: skip
                if chunk:
                    last = chunk
                yield chunk

        uri = self.objects.write(f"{file_id}.jsonl", counted())
        lines = newlines + (0 if last.endswith(b"\n") else 1)
        if lines > self.settings.batch_max_lines:
            self.objects.delete(uri)
            raise InvalidRequest(f"the file has over {self.settings.batch_max_lines} lines", field="file")
        record = FileRecord(id=file_id, owner=owner, purpose=purpose, filename=filename, bytes=size,
                            created_at=now(), lines=lines, parts=[uri])  # fmt: skip
        self.store.add_file(record)
        return record

    def upload_path(self, path: str | Path, owner: str = "") -> FileRecord:
        path = Path(path)
        with path.open("rb") as handle:
            return self.upload(iter(lambda: handle.read(CHUNK_BYTES), b""), path.name, owner=owner)

    def reference(self, uri: str, owner: str = "") -> FileRecord:
        """A file record for input already in object storage (`s3://…`), read from there, not copied."""
        if not uri.startswith("s3://"):
            raise InvalidRequest(f"input must be a local file or an s3:// URI, got {uri!r}", field="input_file")
        record = FileRecord(id=new_file_id(), owner=owner, purpose="batch", filename=uri.rsplit("/", 1)[-1],
                            bytes=0, created_at=now(), parts=[uri])  # fmt: skip
        self.store.add_file(record)
        return record

    def file(self, file_id: str, owner: str | None = None) -> FileRecord:
        if (record := self.store.file(file_id, owner)) is None:
            raise BatchNotFound(file_id)
        return record

    def content(self, record: FileRecord) -> Iterator[bytes]:
        for part in record.parts:
            yield from self.objects.read(part)

    def delete_file(self, record: FileRecord) -> None:
        if record.purpose == "batch":  # output parts stay until their batch's record goes
            for part in record.parts:
                if part.startswith(self.objects.uri_for("")):  # never an s3:// input we only referenced
                    self.objects.delete(part)
        self.store.delete_file(record)

    # --- batches --------------------------------------------------------------------------
    def create(
        self, input_file_id: str, *, endpoint: str = ENDPOINT, completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None, owner: str = "", tenant: str = "default",
    ) -> BatchRecord:  # fmt: skip
        """A batch in `validating`; a runner validates and runs it. InvalidRequest or BatchNotFound."""
        if endpoint != ENDPOINT:
            raise InvalidRequest(f"endpoint must be {ENDPOINT!r}; got {endpoint!r}", field="endpoint")
        window = window_seconds(completion_window)
        if metadata is not None and (not isinstance(metadata, Mapping) or len(metadata) > 16
                                     or not all(isinstance(v, str) for v in metadata.values())):  # fmt: skip
            raise InvalidRequest("metadata must be at most 16 string values", field="metadata")
        source = self.file(input_file_id, owner)
        if source.purpose != "batch":
            raise InvalidRequest(f"file {input_file_id} has purpose {source.purpose!r}, not 'batch'",
                                 field="input_file_id")  # fmt: skip
        created = now()
        record = BatchRecord(
            id=new_batch_id(), owner=owner, tenant=check_tenant(tenant), input_file_id=input_file_id,
            endpoint=endpoint, completion_window=completion_window, metadata=dict(metadata) if metadata else None,
            priority=self.settings.batch_priority, created_at=created, expires_at=created + window,
        )  # fmt: skip
        self.store.add_batch(record)
        return record

    def get(self, batch_id: str, owner: str | None = None) -> BatchRecord:
        if (record := self.store.batch(batch_id, owner)) is None:
            raise BatchNotFound(batch_id)
        return record

    def cancel(self, batch_id: str, owner: str | None = None) -> BatchRecord:
        """Ask for the batch to stop: queued lines are cancelled at once, running ones finish. The record
        says `cancelling` at once (the runner moves the stored record there and then to `cancelled`)."""
        record = self.get(batch_id, owner)
        if record.status.finished:
            return record
        self.store.request_cancel(batch_id)
        return self.get(batch_id, owner)

    def results(self, record: BatchRecord) -> Iterator[bytes]:
        """The output file's lines, then the error file's."""
        for file_id in (record.output_file_id, record.error_file_id):
            if file_id is not None:
                yield from self.content(self.file(file_id))
