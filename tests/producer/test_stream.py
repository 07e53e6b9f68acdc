"""`Client.stream`: a streamed job's text as it is published, ending when the job ends, with typed errors.
A "worker" here is the stream's and the record's owners driven by hand, so each step is exact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from varco.producer import Client, JobCancelled, JobFailed, JobNotFound, StreamNotRequested
from varco.tasks.schemas import ErrorInfo, JobState
from varco.tasks.settings import Settings
from varco.workers.devtools.local_redis import start_redis

URL = "https://cdn.example.com/cat.jpg"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    with start_redis(tmp_path) as server, Client(Settings(broker_url=server.url, _env_file=None)) as c:
        yield c


def test_text_arrives_while_the_job_runs_and_the_stream_ends_with_the_job(client: Client) -> None:
    job_id = client.submit(URL, "caption", stream=True)
    pieces = client.stream(job_id)
    client.statuses.transition(job_id, JobState.STARTED)
    client.deltas.append(job_id, "A <obj>cat")
    assert next(pieces) == "A <obj>cat" and client.status(job_id).state is JobState.STARTED
    client.deltas.append(job_id, "</obj>.")
    assert next(pieces) == "</obj>."
    client.statuses.transition(job_id, JobState.SUCCEEDED, result_uri="s3://r/x.json")
    client.deltas.end(job_id, "succeeded", finish_reason="stop")
    assert list(pieces) == []
    assert "".join(client.stream(job_id)) == "A <obj>cat</obj>."  # called again: from the start


def test_a_job_ended_without_its_run_ends_the_stream_on_its_record(client: Client) -> None:
    queued = client.submit(URL, "ocr", stream=True)
    assert client.cancel(queued)  # cancelled in the queue: no run writes the end
    with pytest.raises(JobCancelled):
        list(client.stream(queued))
    failed = client.submit(URL, "ocr", stream=True)
    client.statuses.transition(failed, JobState.STARTED)
    client.deltas.append(failed, "half")
    client.statuses.transition(failed, JobState.FAILED, error=ErrorInfo(type="InferenceError", message="boom"))
    pieces = client.stream(failed)
    assert next(pieces) == "half"
    with pytest.raises(JobFailed) as info:
        next(pieces)
    assert info.value.error is not None and info.value.error.type == "InferenceError"


def test_jobs_that_do_not_stream_and_unknown_jobs_are_typed_errors(client: Client) -> None:
    plain = client.submit(URL, "ocr")
    with pytest.raises(StreamNotRequested, match="stream=True"):
        next(client.stream(plain))
    with pytest.raises(JobNotFound):
        next(client.stream("0" * 32))
    streamed = client.submit(URL, "ocr", stream=True)
    with pytest.raises(TimeoutError):
        next(client.stream(streamed, timeout=0.01))
