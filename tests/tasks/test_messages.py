"""What a worker accepts from the broker: the job id pattern and every limit the Client applies."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from varco.tasks.job_ids import InvalidJobId, check_job_id, is_valid_job_id
from varco.tasks.messages import InferMessage
from varco.tasks.requests import MAX_METADATA_DEPTH, InvalidRequest, validate_request
from varco.tasks.results_store import FileResultStore

REQUEST = {"image_uri": "https://example.com/cat.png", "task": "caption"}


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("job_id", ["0f" * 16, "6f1c2d3e-aaaa-4bbb-8ccc-0123456789ab", "job_1", "A"])
def test_valid_job_ids(job_id: str) -> None:
    assert check_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", ["", "./../x", "../x", "a/b", "a.b", "a:b", "-x", "x" * 65, "a\x00", 7, None])
def test_malformed_job_ids(job_id: object) -> None:
    assert not is_valid_job_id(job_id)
    with pytest.raises(InvalidJobId):
        check_job_id(job_id)


def test_result_store_never_writes_outside_its_directory(tmp_path: Path) -> None:
    store = FileResultStore((tmp_path / "results").as_uri() + "/")
    with pytest.raises(InvalidJobId):
        store.write("./../escaped", b"{}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_message_without_a_usable_job_id_is_dropped() -> None:
    assert InferMessage.from_task_args(("./../x", REQUEST), {}).job_id is None
    assert InferMessage.from_task_args((), {}).job_id is None


def test_wrong_arguments_are_invalid_requests_not_type_errors() -> None:
    message = InferMessage.from_task_args(("abc", REQUEST, None, "extra"), {"surprise": 1})
    assert message.job_id == "abc"
    with pytest.raises(InvalidRequest, match=r"positional arguments.*surprise"):
        message.validate(1024)
    with pytest.raises(InvalidRequest, match="no request"):
        InferMessage.from_task_args(("abc",), {}).validate(1024)


def test_worker_applies_the_data_uri_limit() -> None:
    uri = "data:image/png;base64," + base64.b64encode(b"x" * 5000).decode()
    with pytest.raises(InvalidRequest, match="VARCO_MAX_DATA_URI_BYTES"):
        InferMessage.from_task_args(("abc", {**REQUEST, "image_uri": uri}), {}).validate(4096)
    request, _ = InferMessage.from_task_args(("abc", {**REQUEST, "image_uri": uri}), {}).validate(8192)
    assert request.image_uri == uri


@pytest.mark.parametrize("depth", [MAX_METADATA_DEPTH + 1, 900, 5000])
def test_deep_metadata_is_a_typed_error_on_both_sides(depth: int) -> None:
    with pytest.raises(InvalidRequest, match="nested"):
        validate_request(**REQUEST, metadata=nested(depth))
    with pytest.raises(InvalidRequest, match="nested"):
        InferMessage.from_task_args(("abc", {**REQUEST, "metadata": nested(depth)}), {}).validate(1024)
    assert validate_request(**REQUEST, metadata=nested(MAX_METADATA_DEPTH)).metadata


@pytest.mark.parametrize("value", [123, 1.5, ["2026-01-01"], "yesterday"])
def test_enqueued_at_must_be_an_iso_time(value: object) -> None:
    with pytest.raises(InvalidRequest, match="enqueued_at"):
        InferMessage.from_task_args(("abc", REQUEST, value), {}).validate(1024)
    assert InferMessage.from_task_args(("abc", REQUEST), {"enqueued_at": "2026-01-01T00:00:00+00:00"}).validate(1024)
