"""Fuzzing request validation (tasks/requests.py) with JSON bodies near the real ones: every field, any JSON
value in it, hostile strings. A body is either a JobRequest or an InvalidRequest that names a field the
request has (or none); never another exception. What is accepted survives the broker (JSON round trip),
has a fingerprint, and builds its model prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fuzz_settings import FUZZ, corpus
from hypothesis import given
from hypothesis import strategies as st

from varco.tasks.requests import CALLBACK_EVENTS, InvalidRequest, JobRequest, check_data_uri_size, validate_request
from varco.tasks.tag_patterns import CONTROL_TOKENS, VARCO_TAGS

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)
HOSTILE = st.sampled_from([*VARCO_TAGS, *CONTROL_TOKENS, "", " ", "\x00", "몇 명이 있나요?", "a" * 9000, "\ud800"])
TEXT = st.one_of(st.text(max_size=40), HOSTILE, st.lists(HOSTILE, max_size=4).map("".join))
URI = st.one_of(
    st.sampled_from(["https://e.example/a.png", "s3://b/k.png", "file:///srv/a.png", "data:image/png;base64,AAAA"]),
    st.tuples(st.sampled_from(["http", "HTTPS", "s3", "file", "data", "ftp", "javascript", ""]),
              st.sampled_from([":", "://", ":///"]), TEXT).map("".join),
    TEXT,
)  # fmt: skip
NUMBER = st.one_of(st.floats(), st.integers(-10, 10_000), st.booleans(), st.text(max_size=4))
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "image_uri": URI,
    "task": st.one_of(st.sampled_from(["caption", "grounding", "referring", "ocr", "vqa", "VQA", "poetry"]), JSON),
    "prompt": st.one_of(st.none(), TEXT),
    "region": st.one_of(st.none(), st.lists(NUMBER, min_size=3, max_size=5), JSON),
    "label": st.one_of(st.none(), TEXT),
    "callback_url": st.one_of(st.none(), URI),
    "callback_events": st.one_of(st.none(), st.lists(st.sampled_from([*CALLBACK_EVENTS, "job.x"]), max_size=3)),
    "idempotency_key": st.one_of(st.none(), TEXT),
    "priority": st.one_of(st.none(), NUMBER),
    "metadata": st.one_of(st.dictionaries(st.text(max_size=5), JSON, max_size=4), JSON),
    "max_new_tokens": st.one_of(st.none(), NUMBER),
    "tenant": st.one_of(st.sampled_from(["default", "acme"]), TEXT),
    "deadline_s": st.one_of(st.none(), NUMBER),
    "colour": JSON,  # not a field: always refused
}
REQUIRED = ("image_uri", "task")
BODY = st.fixed_dictionaries(
    {k: FIELDS[k] for k in REQUIRED}, optional={k: v for k, v in FIELDS.items() if k not in REQUIRED}
)


def check(body: dict[str, Any]) -> None:
    try:
        request = validate_request(**body)
    except InvalidRequest as exc:
        assert str(exc).startswith("invalid job request: ")
        assert exc.field is None or exc.field in body or exc.field in JobRequest.model_fields, exc.field
        return
    again = JobRequest.model_validate_json(request.model_dump_json())  # what a worker receives
    assert again == request and again.fingerprint() == request.fingerprint()
    assert isinstance(request.model_prompt, str)
    try:
        check_data_uri_size(request.image_uri, 1024)
    except InvalidRequest as exc:
        assert exc.field == "image_uri"


@FUZZ
@given(body=BODY)
def test_any_body_is_a_request_or_an_invalid_request_naming_its_field(body: dict[str, Any]) -> None:
    check(body)


@pytest.mark.parametrize("path", corpus("requests"), ids=lambda p: p.name)
def test_the_corpus_is_refused_or_taken_cleanly(path: Path) -> None:
    check(json.loads(path.read_text(encoding="utf-8")))
