"""The batch runner: a thread in each `varco worker` node's callback process (no daemon of its own).

Every poll it looks at the active batches and takes a lease on each one no other runner holds, then moves
it on: validating (stream the input, check every line) -> in_progress (stream the input from the checkpoint,
submit lines as jobs a chunk at a time; each chunk's job ids and the new checkpoint are written in one fenced
step) -> finalizing once every job has finished (stream the input again beside the job ids, write output and
error parts a chunk at a time, checkpointed) -> completed, expired or cancelled.

A runner killed -9 leaves its lease to expire (VARCO_BATCH_LEASE_S); another node's runner takes the batch
and resumes at the checkpoint. A chunk submitted again after a crash reuses its idempotency keys (batch id
+ line number), so no line runs twice; a part written again overwrites the same object.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

from varco.tasks.batches import BatchRecord, BatchStatus, BatchStore, FileRecord, LeaseLost, LineError, dumps_line
from varco.tasks.fair_queue import QueueFull
from varco.tasks.file_objects import lines
from varco.tasks.schemas import JobResult, JobState, JobStatus

from .batch_lines import Line, failed_line, output_line, parse_line, unanswered_line
from .batches import Batches, window_seconds
from .client import Client

log = logging.getLogger("varco.batches")
EXPAND_CHUNK = 100  # lines submitted per checkpoint
FINAL_PART = 500  # lines per output part (one checkpoint each)
SCAN_CHUNK = 1000  # job statuses read per round trip
MAX_ERRORS = 10  # validation errors listed before giving up on a file


class BatchRunner:
    def __init__(self, client: Client) -> None:
        from varco.gateway.openai_mapping import served_models  # openai types: lazily

        self.client, self.settings = client, client.settings
        self.store = BatchStore(client.redis, self.settings.status_ttl)
        self.batches = Batches(self.settings, self.store)
        self.served = served_models(self.settings.model)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BatchRunner:
        self._thread = threading.Thread(target=self.run, name="batch-runner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # Redis away, a bug: log, and try again next poll; the runner never dies
                log.exception("batch runner poll failed")
            self._stop.wait(self.settings.batch_poll_s)

    def run_once(self) -> None:
        for batch_id in self.store.active():
            token = uuid.uuid4().hex
            if not self.store.claim(batch_id, token, self.settings.batch_lease_s):
                continue  # another runner has it
            try:
                self.advance(batch_id, token)
            except LeaseLost:
                log.warning("batch %s: lease lost; another runner goes on from the checkpoint", batch_id)
            finally:
                self.store.release(batch_id, token)

    # --- one turn on one batch ------------------------------------------------------------
    def advance(self, batch_id: str, token: str) -> None:
        record = self.store.batch(batch_id)
        if record is None:
            return
        turn = _Turn(self.store, record, token, self.settings.batch_lease_s)
        cancelled_early = record.status is BatchStatus.CANCELLING and not record.validated
        if record.status is BatchStatus.VALIDATING or cancelled_early:
            self._validate(turn)  # a batch cancelled while validating still answers each of its lines
        if record.status is BatchStatus.IN_PROGRESS:
            self._expand(turn)
        if record.status in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING):
            self._settle(turn)
        if record.status is BatchStatus.FINALIZING:
            self._finalize(turn)

    def _input(self, record: BatchRecord) -> FileRecord:
        return self.batches.file(record.input_file_id)

    def _validate(self, turn: _Turn) -> None:
        record = turn.record
        errors: list[LineError] = []
        seen: set[str] = set()
        count = 0
        try:
            for count, raw in enumerate(lines(self.batches.content(self._input(record))), 1):
                if count > self.settings.batch_max_lines:
                    errors.append(LineError(code="too_many_lines", line=count,
                                            message=f"over {self.settings.batch_max_lines} lines"))  # fmt: skip
                    break
                parsed = parse_line(raw, count, self.served, record.endpoint)
                if isinstance(parsed, LineError):
                    errors.append(parsed)
                elif parsed.custom_id in seen:
                    errors.append(LineError(code="duplicate_custom_id", line=count, param="custom_id",
                                            message=f"line {count}: custom_id {parsed.custom_id!r} is used by an "
                                                    "earlier line"))  # fmt: skip
                else:
                    seen.add(parsed.custom_id)
                if len(errors) >= MAX_ERRORS:
                    break
                if count % 1000 == 0:
                    turn.renew()
        except Exception as exc:  # the input is gone or unreadable: the batch fails, saying why
            errors.append(LineError(code="file_unreadable", message=f"input file: {type(exc).__name__}: {exc}"))
        if count == 0 and not errors:
            errors.append(LineError(code="empty_file", message="the input file holds no lines"))
        if errors:
            record.errors = errors
            record.move(BatchStatus.FAILED)
            turn.finish()
            log.info("batch %s failed validation: %s", record.id, errors[0].message)
            return
        record.total, record.validated = count, True
        if record.status is BatchStatus.VALIDATING:
            record.move(BatchStatus.IN_PROGRESS)
        turn.save()

    def _expand(self, turn: _Turn) -> None:
        record = turn.record
        if record.expanded >= record.total or self._stopping(turn):
            return
        [part] = self._input(record).parts
        stream = lines(self.batches.objects.read(part, record.input_offset))
        chunk: list[bytes] = []
        size = self._room(record.tenant)
        for raw in stream:
            if size == 0:  # a full queue: the lines wait (without claiming keys only to give them back)
                return
            chunk.append(raw)
            if len(chunk) < size and record.expanded + len(chunk) < record.total:
                continue
            first = record.expanded + 1
            requests = [self._job_fields(record, line, n, f"{record.id}:{n}") for n, line in enumerate(chunk, first)]
            try:
                job_ids = self.client.submit_many(requests, owner=record.owner or None)
            except QueueFull:  # admission control: the lines wait, the batch does not fail
                return
            record.expanded += len(chunk)
            record.input_offset += sum(len(line) for line in chunk)
            turn.save(job_ids)
            chunk = []
            if record.expanded >= record.total or self._stopping(turn) or turn.over():
                return
            size = self._room(record.tenant)

    def _room(self, tenant: str) -> int:
        """How many lines the next chunk may hold under the queued-job limits (docs/tenants.md); 0: none now.
        A submit may still meet QueueFull (others submit too): then the lines wait all the same."""
        room = EXPAND_CHUNK
        if limit := self.settings.max_queued:
            room = min(room, limit - self.client.fair.depth())
        if limit := self.settings.max_queued_per_tenant:
            room = min(room, limit - self.client.fair.depth(tenant))
        return max(room, 0)

    def _job_fields(self, record: BatchRecord, raw: bytes, number: int, idempotency_key: str) -> dict[str, Any]:
        """The job request of line `number`, as the batch submits it."""
        parsed = parse_line(raw, number, self.served, record.endpoint)
        if not isinstance(parsed, Line):
            raise RuntimeError(f"batch {record.id}: {parsed.message} (the input changed since validation)")
        window = float(window_seconds(record.completion_window))  # the same each time: part of the request
        return parsed.request.model_dump(exclude_none=True) | {
            "tenant": record.tenant, "priority": record.priority, "deadline_s": window,
            "idempotency_key": idempotency_key,
        }  # fmt: skip

    def _orphans(self, ids: list[str], statuses: dict[str, JobStatus | None]) -> set[str]:
        """Jobs whose status says queued, for longer than a lease, that the fair queue never got: their
        submitter was killed between the two steps (the idempotency key is bound, the job will never run)."""
        old = time.time() - self.settings.batch_lease_s
        queued = [j for j in ids if (s := statuses.get(j)) is not None and s.state is JobState.QUEUED
                  and s.created_at is not None and s.created_at.timestamp() < old]  # fmt: skip
        unheld = [j for j, held in zip(queued, self.client.fair.holds(queued), strict=True) if not held]
        # Read again after the fair queue: a job picked, run and released since the first read is no longer
        # queued now, while an orphan still is (a released job's status is final before its release).
        again = self.client.statuses.get_many(unheld)
        return {j for j in unheld if (s := again.get(j)) is not None and s.state is JobState.QUEUED}

    def _repair(self, turn: _Turn, orphans: dict[int, str]) -> None:
        """Submit the orphans' lines again, each under a key derived from its orphan (so a repair repeated
        after a crash gets the same new job), point the lines at the new jobs, then drop the orphans."""
        record = turn.record
        [part] = self._input(record).parts
        wanted = dict(orphans)
        for index, raw in enumerate(lines(self.batches.objects.read(part))):
            if index in wanted:
                orphan = wanted.pop(index)
                fields = self._job_fields(record, raw, index + 1, f"{record.id}:{index + 1}:{orphan}")
                try:
                    [job_id] = self.client.submit_many([fields], owner=record.owner or None)
                except QueueFull:
                    return  # next turn
                self.store.replace_job(record.id, turn.token, index, job_id)
                self.client.statuses.delete(orphan)
                log.warning("batch %s: line %d's job %s was never queued (its runner died); now job %s",
                            record.id, index + 1, orphan, job_id)  # fmt: skip
            if not wanted:
                return

    def _stopping(self, turn: _Turn) -> bool:
        """Whether no more lines may start: the batch is cancelled or its window has passed."""
        record = turn.record
        if record.status is BatchStatus.IN_PROGRESS and (asked := self.store.cancel_requested(record.id)):
            record.status, record.cancelling_at = BatchStatus.CANCELLING, asked
        if record.stopped is None:
            if record.status is BatchStatus.CANCELLING:
                record.stopped = "cancelled"
            elif time.time() >= record.expires_at:
                record.stopped = "expired"
            else:
                return False
            turn.save()
            log.info("batch %s %s: its queued lines are cancelled", record.id, record.stopped)
        return True

    def _settle(self, turn: _Turn) -> None:
        record = turn.record
        stopping = self._stopping(turn)
        completed = failed = 0
        prefix = True
        orphans: dict[int, str] = {}
        for start in range(record.settled, record.expanded, SCAN_CHUNK):
            ids = self.store.job_ids(record.id, start, min(start + SCAN_CHUNK, record.expanded))
            statuses = self.client.statuses.get_many(ids)
            if not stopping:
                orphans |= {start + ids.index(j): j for j in self._orphans(ids, statuses)}
            for job_id in ids:
                status = statuses.get(job_id)
                if stopping and status is not None and status.state in (JobState.QUEUED, JobState.RETRYING):
                    self.client.cancel(job_id)  # queued lines stop at once; running ones finish
                    status = self.client.statuses.get(job_id)
                finished = status is None or status.state.finished
                ok = status is not None and status.state is JobState.SUCCEEDED
                if finished and prefix:
                    record.settled += 1
                    record.settled_completed += ok
                    record.settled_failed += not ok
                elif finished:
                    completed += ok
                    failed += not ok
                else:
                    prefix = False
            turn.renew()
        if orphans:
            self._repair(turn, orphans)
        record.completed = record.settled_completed + completed
        record.failed = record.settled_failed + failed
        if record.settled >= record.expanded and (record.expanded >= record.total or stopping):
            record.failed += record.total - record.expanded  # lines never started
            record.move(BatchStatus.FINALIZING)
        turn.save()

    def _finalize(self, turn: _Turn) -> None:
        record = turn.record
        [part] = self._input(record).parts
        stream = lines(self.batches.objects.read(part, record.final_offset))
        while record.finalized < record.total:
            chunk = [raw for _, raw in zip(range(FINAL_PART), stream, strict=False)]
            if not chunk:
                raise RuntimeError(f"batch {record.id}: the input ended before line {record.finalized + 1}")
            ids = self.store.job_ids(record.id, record.finalized, record.finalized + len(chunk))
            statuses = self.client.statuses.get_many(ids)
            outputs: list[bytes] = []
            errors: list[bytes] = []
            for index, raw in enumerate(chunk):
                custom_id = json.loads(raw)["custom_id"]
                job_id = ids[index] if index < len(ids) else None
                line = self._answer(turn, custom_id, job_id, statuses.get(job_id) if job_id else None)
                (outputs if line["response"] and line["response"]["status_code"] == 200 else errors).append(
                    dumps_line(line))  # fmt: skip
            number = record.finalized // FINAL_PART
            for kind, found in (("output", outputs), ("error", errors)):
                if found:
                    uri = self.batches.objects.write(f"{record.id}.{kind}.{number}.jsonl", found)
                    getattr(record, f"{kind}_parts").append(uri)
                    setattr(record, f"{kind}_bytes", getattr(record, f"{kind}_bytes") + sum(map(len, found)))
                    setattr(record, f"{kind}_lines", getattr(record, f"{kind}_lines") + len(found))
            record.finalized += len(chunk)
            record.final_offset += sum(len(raw) for raw in chunk)
            turn.save()
        for kind in ("output", "error"):
            if parts := getattr(record, f"{kind}_parts"):
                file = FileRecord(
                    id=f"file-{record.id.removeprefix('batch_')}-{kind}", owner=record.owner, purpose="batch_output",
                    filename=f"{record.id}_{kind}.jsonl", bytes=getattr(record, f"{kind}_bytes"),
                    created_at=int(time.time()), lines=getattr(record, f"{kind}_lines"), parts=parts,
                )  # fmt: skip
                self.store.add_file(file)  # a deterministic id: written again after a crash, the same file
                setattr(record, f"{kind}_file_id", file.id)
        final = {"cancelled": BatchStatus.CANCELLED, "expired": BatchStatus.EXPIRED}.get(record.stopped or "")
        record.move(final or BatchStatus.COMPLETED)
        turn.finish()
        log.info("batch %s %s: %d completed, %d failed", record.id, record.status.value, record.completed,
                 record.failed)  # fmt: skip

    def _answer(self, turn: _Turn, custom_id: str, job_id: str | None, status: JobStatus | None) -> dict:
        stopped = turn.record.stopped or "expired"
        code, why = ("batch_cancelled", "the batch was cancelled") if stopped == "cancelled" else (
            "batch_expired", "the batch's completion_window ended")  # fmt: skip
        if job_id is None:
            return unanswered_line(custom_id, None, code, f"{why} before this line started")
        if status is None:
            return unanswered_line(custom_id, job_id, "job_lost", "the job's status record expired")
        if status.state is JobState.CANCELLED:
            return unanswered_line(custom_id, job_id, code, f"{why} before this line started")
        if status.state is JobState.FAILED:
            if status.error is not None and status.error.type == "DeadlineExceeded":
                return unanswered_line(custom_id, job_id, "batch_expired", "the batch's completion_window ended")
            return failed_line(custom_id, job_id, status.error)
        result = self._result(turn, job_id, status)
        if result is None:
            return unanswered_line(custom_id, job_id, "result_unavailable", "the job's result could not be read")
        return output_line(custom_id, result)

    def _result(self, turn: _Turn, job_id: str, status: JobStatus) -> JobResult | None:
        """The job's result; read again for up to VARCO_STORE_RETRY_S while the store cannot give it."""
        uri = status.result_uri or self.client.store.uri_for(job_id)
        give_up = time.monotonic() + self.settings.store_retry_s
        while True:
            try:
                return JobResult.model_validate_json(self.client.store.read(uri))
            except Exception as exc:
                if time.monotonic() >= give_up or self._stop.is_set():
                    log.error("batch %s: result of job %s unreadable: %s", turn.record.id, job_id, exc)
                    return None
                log.warning("batch %s: result of job %s unreadable (%s); trying again", turn.record.id, job_id, exc)
                turn.renew()
                time.sleep(1.0)


class _Turn:
    """One runner's lease on one batch, with the record it moves on: fenced saves, renewals, a time slice."""

    def __init__(self, store: BatchStore, record: BatchRecord, token: str, lease_s: float) -> None:
        self.store, self.record, self.token, self.lease_s = store, record, token, lease_s
        self.ends = time.monotonic() + lease_s  # then the other batches get a turn

    def renew(self) -> None:
        self.store.renew(self.record.id, self.token, self.lease_s)

    def save(self, job_ids: list[str] | None = None) -> None:
        self.store.save(self.record, self.token, job_ids)
        self.renew()

    def finish(self) -> None:
        self.store.finish(self.record, self.token)

    def over(self) -> bool:
        return time.monotonic() >= self.ends
