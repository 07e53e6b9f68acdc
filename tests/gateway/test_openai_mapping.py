"""OpenAI chat completion bodies -> job requests, and results -> `chat.completion` (gateway/openai_mapping.py)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("openai")
from helpers import card_output
from openai.types.chat import ChatCompletion

from varco.gateway.openai_mapping import (
    SERVED_ALIAS,
    ChatRequestError,
    UnknownModel,
    model_objects,
    served_models,
    to_chat_completion,
    to_job,
)
from varco.tasks.schemas import ImageInfo, JobResult, JobState, Usage
from varco.tasks.tags import parse

MODEL = "NCSOFT/VARCO-VISION-14B-HF"
SERVED = served_models(MODEL)
IMAGE = "https://images.example/cat.png"
# The model card's conversations, text as the card writes it.
CARD = {
    "caption": "Describe this image.",
    "grounding": "<gro>\nDescribe the image in detail.",
    "referring": "<obj>이 물건</obj><bbox>0.039, 0.138, 0.283, 0.257</bbox>은 어떻게 쓰는거야?",
    "ocr": "<ocr>",
}


def chat(text: str | None = "Describe this image.", url: str = IMAGE, **params: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.insert(0, {"type": "text", "text": text})
    return {"model": SERVED_ALIAS, "messages": [{"role": "user", "content": content}], **params}


def refused(body: Any) -> ChatRequestError:
    with pytest.raises(ChatRequestError) as caught:
        to_job(body, SERVED)
    return caught.value


@pytest.mark.parametrize("task", sorted(CARD))
def test_the_cards_conversations_pick_their_task_and_send_the_cards_text_unchanged(task: str) -> None:
    request = to_job(chat(CARD[task]), SERVED).request
    assert request.task.value == task
    assert request.model_prompt == CARD[task]
    assert request.image_uri == IMAGE


def test_referring_takes_region_and_label_from_the_tags() -> None:
    request = to_job(chat(CARD["referring"]), SERVED).request
    assert (request.region, request.label) == ((0.039, 0.138, 0.283, 0.257), "이 물건")
    assert request.prompt == "은 어떻게 쓰는거야?"
    spaced = to_job(chat("<obj>the cup</obj><bbox>0.1, 0.2, 0.3, 0.4</bbox> What is in it?"), SERVED).request
    assert spaced.model_prompt == "<obj>the cup</obj><bbox>0.1, 0.2, 0.3, 0.4</bbox> What is in it?"  # as written


def test_any_other_text_is_a_question_and_no_text_a_caption() -> None:
    question = to_job(chat("몇 명이 있나요?"), SERVED).request
    assert (question.task.value, question.prompt) == ("vqa", "몇 명이 있나요?")
    assert to_job(chat(None), SERVED).request.task.value == "caption"
    grounding = to_job(chat("<gro>"), SERVED).request  # the tag alone: the default grounding request
    assert (grounding.task.value, grounding.prompt) == ("grounding", None)


def test_max_tokens_metadata_and_user_reach_the_job() -> None:
    assert to_job(chat(max_tokens=77), SERVED).request.max_new_tokens == 77
    assert to_job(chat(max_completion_tokens=78), SERVED).request.max_new_tokens == 78
    assert to_job(chat(max_tokens=79, max_completion_tokens=79), SERVED).request.max_new_tokens == 79
    assert to_job(chat(), SERVED).request.max_new_tokens is None  # the worker's VARCO_MAX_NEW_TOKENS
    request = to_job(chat(metadata={"order": "81"}, user="u-7"), SERVED).request
    assert request.metadata == {"order": "81", "user": "u-7"}


@pytest.mark.parametrize(
    "params",
    [{"temperature": 0}, {"temperature": 0.0}, {"n": 1}, {"stream": False}, {"top_p": 1}, {"seed": 3},
     {"logprobs": False}, {"response_format": {"type": "text"}}, {"temperature": None, "stop": None}],
)  # fmt: skip
def test_parameters_at_the_values_we_serve_anyway_are_accepted(params: dict[str, Any]) -> None:
    assert to_job(chat(**params), SERVED).request.task.value == "caption"


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"temperature": 0.7}, "temperature", "unsupported_parameter"),
        ({"temperature": True}, "temperature", "unsupported_parameter"),
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"stream": "yes"}, "stream", "invalid_value"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        (
            {"stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
            "unsupported_parameter",
        ),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "invalid_value"),
        ({"top_p": 0.9}, "top_p", "unsupported_parameter"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
        ({"stop": ["\n"]}, "stop", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        ({"colour": "red"}, "colour", "unknown_parameter"),
        ({"max_tokens": 10, "max_completion_tokens": 11}, "max_completion_tokens", "invalid_value"),
        ({"max_tokens": "10"}, "max_tokens", "invalid_type"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_completion_tokens": 9000}, "max_completion_tokens", "invalid_value"),
        ({"metadata": {"n": 1}}, "metadata", "invalid_type"),
    ],
)
def test_what_we_do_not_serve_is_refused_naming_the_parameter(params: dict[str, Any], param: str, code: str) -> None:
    error = refused(chat(**params))
    assert (error.param, error.code) == (param, code), error.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": SERVED_ALIAS}, "messages"),
        ({**chat(), "messages": chat()["messages"] * 2}, "messages"),
        ({**chat(), "messages": [{"role": "system", "content": "Be brief."}]}, "messages[0].role"),
        ({**chat(), "messages": [{"role": "user", "content": "Describe this image."}]}, "messages[0].content"),
        ({**chat(), "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
         "messages[0].content"),
        ({**chat(), "messages": [{"role": "user", "content": [*chat()["messages"][0]["content"],
                                                               {"type": "image_url", "image_url": {"url": IMAGE}}]}]},
         "messages[0].content"),
        ({**chat(), "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "messages[0].content[0].type"),
        (chat(url="file:///etc/passwd"), "messages[0].content[1].image_url.url"),
        (chat(url="ftp://host/a.png"), "messages[0].content[1].image_url.url"),
        (chat(url="https:///a.png"), "messages[0].content[1].image_url.url"),
        ({**chat(), "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}}]}]},
         "messages[0].content[0].image_url.detail"),
        ({"messages": chat()["messages"]}, "model"),
    ],
)  # fmt: skip
def test_a_conversation_we_cannot_serve_names_the_part(body: dict[str, Any], param: str) -> None:
    assert refused(body).param == param


@pytest.mark.parametrize(
    "text",
    [
        "<ocr> and read it",  # the card asks OCR with the tag alone
        "What is <gro> this?",  # a task tag in the middle would reach the model as text
        "<obj>a</obj><bbox>0.1, 0.1, 0.2</bbox>why?",  # three numbers
        "<obj>a</obj><bbox>0.1, 0.1, 0.2, 0.2<delim>0.3, 0.3, 0.4, 0.4</bbox>?",  # one region only
        "<obj>a</obj><bbox>0.5, 0.1, 0.2, 0.9</bbox>?",  # reversed corners
        "<obj>a</obj><bbox>0.1, 0.1, 0.2, 0.2</bbox>and <obj>b</obj>?",
        "Describe <|im_end|> this",  # a control token
    ],
)
def test_tags_the_card_does_not_use_that_way_are_refused_on_the_text(text: str) -> None:
    assert refused(chat(text)).param == "messages[0].content[0].text"


def test_an_unknown_model_is_its_own_error() -> None:
    with pytest.raises(UnknownModel):
        to_job({**chat(), "model": "gpt-4o"}, SERVED)
    assert to_job({**chat(), "model": MODEL}, SERVED).request.task.value == "caption"


def test_models_are_the_served_name_and_its_alias() -> None:
    models = model_objects(MODEL, 1700000000)
    assert [m.id for m in models] == [MODEL, SERVED_ALIAS] and {m.owned_by for m in models} == {"NCSOFT"}
    assert [m.id for m in model_objects("/models/tiny", 0)] == ["/models/tiny", SERVED_ALIAS]


def result(raw: str, task: str, finish_reason: str | None = "stop") -> JobResult:
    return JobResult(
        job_id="a" * 32, task=task, state=JobState.SUCCEEDED, model=MODEL, prompt=CARD[task],
        image=ImageInfo(uri=IMAGE, width=640, height=480, sha256="0" * 64), output=parse(raw, (640, 480)),
        usage=Usage(prompt_tokens=1200, output_tokens=73), finish_reason=finish_reason,
        finished_at="2026-12-05T08:00:00+00:00",
    )  # fmt: skip


def test_a_result_is_a_chat_completion_with_the_raw_tags_usage_and_the_varco_object() -> None:
    raw = card_output("grounding")
    completion = to_chat_completion(result(raw, "grounding"))
    again = ChatCompletion.model_validate(completion.model_dump(mode="json"))  # what the SDK parses
    assert again.id == "chatcmpl-" + "a" * 32 and again.object == "chat.completion" and again.model == MODEL
    assert again.created == 1796457600
    [choice] = again.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", raw, "stop")
    assert again.usage is not None
    assert (again.usage.prompt_tokens, again.usage.completion_tokens, again.usage.total_tokens) == (1200, 73, 1273)
    varco = again.model_extra["varco"]
    assert varco["job_id"] == "a" * 32 and varco["task"] == "grounding" and "raw" not in varco["output"]
    assert varco["image"] == {"width": 640, "height": 480}
    assert varco["output"]["objects"][0]["label"] == "two cats"
    assert varco["output"]["objects"][0]["boxes_px"] == [[9, 51, 326, 478], [326, 26, 637, 378]]


def test_ocr_items_carry_both_boxes_and_a_cut_answer_says_length() -> None:
    completion = to_chat_completion(result(card_output("ocr"), "ocr", "length"))
    assert completion.choices[0].finish_reason == "length"
    first = completion.model_extra["varco"]["output"]["ocr"][0]
    assert first == {"text": "백범로", "box": [0.172, 0.266, 0.328, 0.341], "box_px": [110, 128, 210, 164]}
    assert to_chat_completion(result("A cat.", "caption", None)).choices[0].finish_reason == "stop"  # older results


def test_stream_makes_a_streamed_job_and_include_usage_asks_for_the_usage_chunk() -> None:
    plain = to_job(chat(), SERVED)
    assert not plain.request.stream and not plain.include_usage
    streamed = to_job(chat(stream=True, stream_options={"include_usage": True}), SERVED)
    assert streamed.request.stream and streamed.include_usage
    assert not to_job(chat(stream=True, stream_options={"include_obfuscation": False}), SERVED).include_usage


def test_varco_constrained_is_the_jobs_flag_and_must_be_a_boolean() -> None:
    assert to_job(chat(varco_constrained=True), SERVED).request.constrained is True
    assert to_job(chat(varco_constrained=False), SERVED).request.constrained is False
    assert to_job(chat(varco_constrained=None), SERVED).request.constrained is None
    assert to_job(chat(), SERVED).request.constrained is None
    assert refused(chat(varco_constrained="yes")).param == "varco_constrained"
