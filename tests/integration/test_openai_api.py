"""The OpenAI surface end to end, through the official `openai` SDK: `varco gateway` (uvicorn) -> Redis ->
`varco worker` (the tiny model, scripted with the card's answers) -> S3 results -> `chat.completion`."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
import openai
from conftest import CAT, GATEWAY_KEYS, IMAGES_BUCKET, LONG, LONG_ANSWER_TOKENS, forced_tokens, wait_for_state
from helpers import ServedFiles, card_output

from varco.gateway.auth import key_id
from varco.gateway.openai_mapping import SERVED_ALIAS
from varco.producer import Client, StreamNotRequested

ALICE, BOB = GATEWAY_KEYS
# The model card's conversations, text as the card writes it.
CARD = {
    "caption": "Describe this image.",
    "grounding": "<gro>\nDescribe the image in detail.",
    "referring": "<obj>이 물건</obj><bbox>0.039, 0.138, 0.283, 0.257</bbox>은 어떻게 쓰는거야?",
    "ocr": "<ocr>",
}
ANSWERS = {"caption": "A red picture.", **{task: card_output(task) for task in ("grounding", "referring", "ocr")}}


@pytest.fixture
def api(gateway: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway + "/v1", api_key=ALICE, max_retries=0, timeout=120) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def images(http_files: ServedFiles) -> dict[str, str]:
    return {
        "http": http_files.base + "/cat.png",
        "data": "data:image/png;base64," + base64.b64encode(CAT).decode(),
        "text": http_files.base + "/not-an-image.txt",
        "long": http_files.add("/openai-long.png", LONG),
    }


def ask(text: str | None, url: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.insert(0, {"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def job_ids(client: Client) -> set[str]:
    return {k.removeprefix("varco:job:") for k in client.redis.scan_iter("varco:job:*")}


def test_models_list_names_the_served_model_and_its_alias(api: openai.OpenAI, settings) -> None:
    models = api.models.list()
    assert [m.id for m in models.data] == [settings.model, SERVED_ALIAS]
    assert api.models.retrieve(SERVED_ALIAS).object == "model"


@pytest.mark.parametrize("source", ["data", "http"])
@pytest.mark.parametrize("task", sorted(CARD))
def test_the_cards_conversations_answer_with_tags_usage_and_the_varco_object(
    api: openai.OpenAI, gateway: str, images: dict[str, str], task: str, source: str
) -> None:
    completion = api.chat.completions.create(model=SERVED_ALIAS, messages=ask(CARD[task], images[source]),
                                             max_tokens=1024)  # fmt: skip
    [choice] = completion.choices
    assert choice.message.content == ANSWERS[task]  # the model's text with its tags, as the card prints it
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    varco = completion.model_extra["varco"]
    assert varco["task"] == task and completion.id == f"chatcmpl-{varco['job_id']}"
    assert varco["image"] == {"width": 640, "height": 480}
    output = varco["output"]
    if task == "grounding":
        assert output["objects"][0]["label"] == "two cats"
        assert output["objects"][0]["boxes_px"] == [[9, 51, 326, 478], [326, 26, 637, 378]]
    elif task == "ocr":
        assert len(output["ocr"]) == 16
        first = output["ocr"][0]
        assert first == {"text": "백범로", "box": [0.172, 0.266, 0.328, 0.341], "box_px": [110, 128, 210, 164]}
    else:
        assert output["text"] and "<" not in output["text"]
    # A job like any other: the same key reads it on /v1/jobs.
    status = httpx.get(f"{gateway}/v1/jobs/{varco['job_id']}", headers={"Authorization": f"Bearer {ALICE}"})
    assert status.json()["state"] == "succeeded" and status.json()["task"] == task


def test_an_allowed_s3_image_and_a_cut_answer(api: openai.OpenAI, images: dict[str, str]) -> None:
    ocr = api.chat.completions.create(model=SERVED_ALIAS, messages=ask("<ocr>", f"s3://{IMAGES_BUCKET}/in/sign.png"),
                                      max_completion_tokens=1024)  # fmt: skip
    assert ocr.choices[0].message.content == card_output("ocr")
    assert ocr.model_extra["varco"]["image"] == {"width": 800, "height": 400}
    cut = api.chat.completions.create(model=SERVED_ALIAS, messages=ask(None, images["http"]), max_tokens=5)
    assert cut.choices[0].finish_reason == "length" and cut.usage is not None and cut.usage.completion_tokens == 5
    assert ANSWERS["caption"].startswith(cut.choices[0].message.content or "?")


def test_a_bad_image_is_a_400_on_the_image_url(api: openai.OpenAI, images: dict[str, str]) -> None:
    for url in (images["text"], "data:image/png;base64,bm90IGFuIGltYWdl"):
        with pytest.raises(openai.BadRequestError) as bad:
            api.chat.completions.create(model=SERVED_ALIAS, messages=ask("What is it?", url))
        assert bad.value.code == "invalid_image" and bad.value.param == "messages[0].content[1].image_url.url"
        assert "ImageDecodeError" in bad.value.message
        assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_a_bad_parameter_and_an_unknown_model_are_openai_errors(
    api: openai.OpenAI, images: dict[str, str], client: Client
) -> None:
    before = job_ids(client)
    with pytest.raises(openai.BadRequestError) as sampled:
        api.chat.completions.create(model=SERVED_ALIAS, messages=ask("Hi?", images["http"]), temperature=0.7)
    assert (sampled.value.param, sampled.value.code) == ("temperature", "unsupported_parameter")
    with pytest.raises(openai.BadRequestError) as streamed:
        api.chat.completions.create(model=SERVED_ALIAS, messages=ask("Hi?", images["http"]),
                                    stream_options={"include_usage": True})  # fmt: skip
    assert streamed.value.param == "stream_options"  # only with stream: true, as OpenAI says
    with pytest.raises(openai.NotFoundError) as unknown:
        api.chat.completions.create(model="gpt-4o", messages=ask("Hi?", images["http"]))
    assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")
    with openai.OpenAI(base_url=api.base_url, api_key="not-a-key", max_retries=0) as stranger, pytest.raises(
        openai.AuthenticationError
    ):  # fmt: skip
        stranger.models.list()
    assert job_ids(client) == before  # nothing was enqueued


def test_a_caller_that_disconnects_cancels_its_job(
    api: openai.OpenAI, images: dict[str, str], client: Client, worker_env: dict[str, str]
) -> None:
    before_jobs, before_tokens = job_ids(client), forced_tokens(worker_env, LONG)
    impatient = api.with_options(timeout=3.0)  # the LONG answer is 6000 scripted tokens: far longer than that
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=SERVED_ALIAS, messages=ask(None, images["long"]),
                                          max_tokens=LONG_ANSWER_TOKENS + 500)  # fmt: skip
    [job_id] = job_ids(client) - before_jobs
    assert client.statuses.record(job_id)["owner"] == key_id(ALICE)
    wait_for_state(client, job_id, {"cancelled"})  # queued or running when the caller left: cancelled either way
    assert forced_tokens(worker_env, LONG) - before_tokens < LONG_ANSWER_TOKENS  # a running one stopped early


def test_a_streamed_completion_arrives_in_chunks_while_its_job_runs_with_usage(
    api: openai.OpenAI, images: dict[str, str], client: Client
) -> None:
    states: list[str] = []  # the job's state as each piece of text arrives
    pieces: list[str] = []
    with api.chat.completions.create(model=SERVED_ALIAS, messages=ask(None, images["long"]), max_tokens=256,
                                     stream=True, stream_options={"include_usage": True}) as stream:  # fmt: skip
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                job_id = chunk.id.removeprefix("chatcmpl-")
                states.append(client.status(job_id).state.value)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert states.count("started") >= 3  # several chunks came before the job ended: as the model wrote them
    text = "".join(pieces)
    assert text == "a" * len(text) and len(text) >= 256  # the scripted answer, cut at the budget
    finish, usage = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 256
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + 256
    assert client.status(job_id).state.value == "succeeded"
    assert client.result(job_id).output.raw == text  # the pieces joined are the answer, tags and all


def test_a_streamed_completion_keeps_the_cards_tags(api: openai.OpenAI, images: dict[str, str]) -> None:
    stream = api.chat.completions.create(model=SERVED_ALIAS, messages=ask(CARD["grounding"], images["data"]),
                                         max_tokens=1024, stream=True)  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWERS["grounding"]
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) > 3


def test_client_stream_yields_the_text_as_written_from_its_start_each_time(
    client: Client, images: dict[str, str]
) -> None:
    first = client.submit(images["http"], "ocr", stream=True, max_new_tokens=1024)
    pieces = list(client.stream(first, timeout=120))
    assert len(pieces) > 1 and "".join(pieces) == card_output("ocr") == client.result(first).output.raw
    assert list(client.stream(first)) == pieces  # a reader that comes after the end reads it all
    plain = client.submit(images["http"], "caption")
    with pytest.raises(StreamNotRequested):
        next(client.stream(plain))
