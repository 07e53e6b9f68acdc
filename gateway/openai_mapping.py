"""OpenAI chat completions <-> our jobs, without I/O: a request body becomes a JobRequest, a JobResult a
`chat.completion`.

The task comes from the card's own tags at the start of the user text, so the model card's
conversations work unchanged: `<gro>` grounding, `<ocr>` OCR, `<obj>label</obj><bbox>x1, y1, x2, y2</bbox>`
referring (region and label from them), anything else a question about the image (caption when it is
the card's "Describe this image." or empty, else vqa). What we cannot serve (sampling, tools, several
images or turns…) is refused with the parameter named, never silently ignored.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from openai.types import CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionMessage, completion_create_params
from openai.types.chat.chat_completion import Choice
from pydantic import BaseModel

from varco.tasks.prompts import DEFAULT_CAPTION_PROMPT, TaskType, find_varco_tag
from varco.tasks.requests import InvalidRequest, JobRequest, validate_request
from varco.tasks.schemas import JobResult, ParsedOutput

SERVED_ALIAS = "varco-vision"  # the short name `GET /v1/models` lists beside VARCO_MODEL
IMAGE_SCHEMES = ("http", "https", "data", "s3")  # not file://: the gateway's callers do not own the worker's disk
MESSAGE_KEYS = {"role", "content", "name"}

# Every parameter OpenAI's SDK can send (its own TypedDicts), so an unknown one is told apart from an unserved one.
OPENAI_PARAMS = frozenset(
    typing.get_type_hints(completion_create_params.CompletionCreateParamsNonStreaming)
    | typing.get_type_hints(completion_create_params.CompletionCreateParamsStreaming)
)
# Parameters we take, and what we do with them.
USED_PARAMS = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "metadata", "user", "stream", "stream_options"}
)
# Parameters accepted at the value that means what we do anyway (greedy decoding, one text answer).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "temperature": (0,),
    "top_p": (1,),
    "n": (1,),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logprobs": (False,),
    "store": (False,),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "service_tier": ("auto", "default"),
    "logit_bias": ({},),
}
# Our extensions of the body (sent with the SDK's `extra_body`): `varco_constrained`, true/false/null, is a
# job's `constrained` flag (tag-constrained decoding; null: the server's default).
VARCO_PARAMS = frozenset({"varco_constrained"})
# Accepted with any value: greedy decoding is deterministic already (seed); nothing to call in parallel.
MOOT_PARAMS = frozenset({"seed", "parallel_tool_calls"})

_REFERRING = re.compile(r"<obj>(?P<label>[^<]*)</obj><bbox>(?P<box>[^<]*)</bbox>(?P<rest>.*)", re.DOTALL)
_CARD_FORMS = (
    "the card's tags go at the start of the text: '<gro>' + a request, '<ocr>' alone, or "
    "'<obj>label</obj><bbox>x1, y1, x2, y2</bbox>' + a question"
)


class ChatRequestError(ValueError):
    """A chat completion body we cannot serve: the message, the OpenAI parameter it concerns, a code."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class UnknownModel(LookupError):
    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


@dataclass(frozen=True)
class ChatJob:
    """The job a chat completion asks for, and which body parameter each job field came from."""

    request: JobRequest
    params: Mapping[str, str] = field(default_factory=dict)
    include_usage: bool = False  # a streamed answer's usage chunk (stream_options.include_usage)

    def param_for(self, job_field: str | None) -> str | None:
        """The OpenAI parameter to name for an error about `job_field` (e.g. image_uri -> its image_url)."""
        return self.params.get(job_field or "", job_field)


class VarcoExtra(BaseModel):
    """The top-level `varco` object of a completion: the job, and the parsed tags, so nobody parses them twice."""

    job_id: str
    task: str
    image: dict[str, int]  # width, height: what `boxes_px` and `box_px` count in
    output: dict[str, Any]  # ParsedOutput without `raw` (that is the message content)
    cached_from: str | None = None


def served_models(model: str) -> tuple[str, ...]:
    """The model ids requests may name: VARCO_MODEL and the short alias."""
    return (model, SERVED_ALIAS) if model != SERVED_ALIAS else (model,)


def model_objects(model: str, created: int) -> list[Model]:
    owner = model.split("/")[0] if model.count("/") == 1 and not model.startswith((".", "/")) else "varco-queue"
    return [Model(id=m, object="model", created=created, owned_by=owner) for m in served_models(model)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _neutral(name: str, value: Any) -> bool:
    allowed = NEUTRAL_VALUES[name]
    if all(_is_number(a) for a in allowed):
        return _is_number(value) and value in allowed
    return any(type(value) is type(a) and value == a for a in allowed)


def check_params(body: Mapping[str, Any]) -> None:
    """Refuse every parameter we would otherwise ignore. None counts as absent, as in OpenAI's API."""
    for name, value in body.items():
        if value is None and name not in ("model", "messages"):
            continue
        if name in VARCO_PARAMS:
            continue
        if name not in OPENAI_PARAMS:
            raise ChatRequestError(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
        if name in USED_PARAMS or name in MOOT_PARAMS:
            continue
        if name in NEUTRAL_VALUES and _neutral(name, value):
            continue
        if name in NEUTRAL_VALUES:
            served = " or ".join(repr(v) for v in NEUTRAL_VALUES[name])
            message = f"{name}={value!r} is not served: VARCO-VISION is served with greedy decoding ({name} {served})"
        else:
            message = f"{name} is not served by varco-queue's chat completions (one image, one question, one answer)"
        raise ChatRequestError(message, name, "unsupported_parameter")


@dataclass
class _UserTurn:
    image_url: str
    image_param: str
    text: str | None
    text_param: str


def _user_turn(messages: Any) -> _UserTurn:
    if not isinstance(messages, list) or len(messages) != 1:
        count = len(messages) if isinstance(messages, list) else "no"
        raise ChatRequestError(
            f"messages must hold exactly one user message (an image and its question); got {count} messages",
            "messages",
        )  # fmt: skip
    message = messages[0]
    if not isinstance(message, dict):
        raise ChatRequestError("messages[0] must be an object", "messages[0]")
    if message.get("role") != "user":
        raise ChatRequestError(f"messages[0].role must be 'user', got {message.get('role')!r}", "messages[0].role")
    if unknown := sorted(set(message) - MESSAGE_KEYS):
        raise ChatRequestError(f"messages[0].{unknown[0]} is not served", f"messages[0].{unknown[0]}")
    content = message.get("content")
    if not isinstance(content, list):
        raise ChatRequestError(
            "messages[0].content must be a list of parts holding one image_url part (and a text part)",
            "messages[0].content",
        )  # fmt: skip
    images: list[tuple[str, str]] = []
    texts: list[tuple[str, str]] = []
    for index, part in enumerate(content):
        where = f"messages[0].content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str) and set(part) == {"type", "text"}:
            texts.append((part["text"], f"{where}.text"))
        elif kind == "image_url":
            images.append(_image_part(part, where))
        else:
            raise ChatRequestError(
                f"{where}: only 'text' and 'image_url' parts are served, got {kind!r}", f"{where}.type"
            )
    if len(images) != 1:
        raise ChatRequestError(
            f"messages[0].content must hold exactly one image_url part; got {len(images)}", "messages[0].content"
        )
    if len(texts) > 1:
        raise ChatRequestError(f"messages[0].content may hold one text part; got {len(texts)}", texts[1][1])
    text, text_param = texts[0] if texts else (None, "messages[0].content")
    return _UserTurn(images[0][0], images[0][1], text, text_param)


def _image_part(part: dict[str, Any], where: str) -> tuple[str, str]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else None
    param = f"{where}.image_url.url"
    if not isinstance(url, str) or set(part) != {"type", "image_url"}:
        raise ChatRequestError(f"{where} must be {{'type': 'image_url', 'image_url': {{'url': ...}}}}", param)
    assert isinstance(image, dict)
    if image.get("detail", "auto") != "auto":
        raise ChatRequestError(
            f"{where}.image_url.detail={image['detail']!r} is not served: images are tiled as the model's "
            "processor does ('auto')", f"{where}.image_url.detail",
        )  # fmt: skip
    if unknown := sorted(set(image) - {"url", "detail"}):
        raise ChatRequestError(f"{where}.image_url.{unknown[0]} is not served", f"{where}.image_url.{unknown[0]}")
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme not in IMAGE_SCHEMES:
        raise ChatRequestError(
            f"image URL scheme {scheme or '(none)'!r} is not served; expected one of {', '.join(IMAGE_SCHEMES)}",
            param, "invalid_image_url",
        )  # fmt: skip
    return url, param


def task_fields(text: str | None) -> dict[str, Any]:
    """The task, prompt, region and label the user text asks for, read from the card's tags at its start."""
    text = (text or "").strip()
    if text.startswith("<gro>"):
        fields: dict[str, Any] = {"task": TaskType.GROUNDING, "prompt": text.removeprefix("<gro>").strip() or None}
    elif text.startswith("<ocr>"):
        fields = {"task": TaskType.OCR}
        if text != "<ocr>":
            raise ChatRequestError("'<ocr>' takes no other text (the card asks with '<ocr>' alone)", None)
    elif text.startswith("<obj>"):
        match = _REFERRING.fullmatch(text)
        if match is None:
            raise ChatRequestError(f"the text starts with '<obj>' but is not a referring question: {_CARD_FORMS}",
                                   None)  # fmt: skip
        fields = {
            "task": TaskType.REFERRING,
            "region": _region(match["box"]),
            "label": match["label"].strip() or None,
            "prompt": match["rest"] or None,
        }
    elif not text or text == DEFAULT_CAPTION_PROMPT:
        fields = {"task": TaskType.CAPTION, "prompt": text or None}
    else:
        fields = {"task": TaskType.VQA, "prompt": text}
    if (tag := find_varco_tag(fields.get("prompt") or "")) is not None:
        raise ChatRequestError(f"the text holds {tag!r} where the model would not read it as a task: {_CARD_FORMS}",
                               None)  # fmt: skip
    return fields


def _region(box: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in box.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ChatRequestError(f"<bbox>{box}</bbox> must hold four numbers: x1, y1, x2, y2 in 0..1", None)
    return values


def _max_tokens(body: Mapping[str, Any]) -> tuple[int | None, str]:
    given = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    for name, value in given.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ChatRequestError(f"{name} must be an integer", name, "invalid_type")
    if len(set(given.values())) > 1:
        raise ChatRequestError("max_tokens and max_completion_tokens disagree: send one", "max_completion_tokens")
    name = next(iter(given), "max_completion_tokens")
    return given.get(name), name


def _metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ChatRequestError("metadata must be an object of string values", "metadata", "invalid_type")
    if (user := body.get("user")) is not None:
        if not isinstance(user, str) or "user" in metadata:
            raise ChatRequestError("user must be a string, and not also a metadata key", "user")
        metadata = {**metadata, "user": user}
    return metadata


def requested_model(body: Any, served: Sequence[str]) -> str:
    """The body's `model`; UnknownModel when we do not serve it."""
    if not isinstance(body, dict):
        raise ChatRequestError("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ChatRequestError("model is required: one of the ids GET /v1/models lists", "model", "missing_required")
    if model not in served:
        raise UnknownModel(model)
    return model


def _streaming(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """`stream` and `stream_options.include_usage`, checked as OpenAI checks them."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ChatRequestError(f"stream must be a boolean, got {stream!r:.40}", "stream")
    if options is None:
        return bool(stream), False
    if not stream:
        raise ChatRequestError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                               "stream_options")  # fmt: skip
    if not isinstance(options, dict):
        raise ChatRequestError("stream_options must be an object", "stream_options")
    for name, value in options.items():
        if name != "include_usage" and value not in (None, False):
            raise ChatRequestError(f"stream_options.{name} is not served", f"stream_options.{name}",
                                   "unsupported_parameter")  # fmt: skip
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise ChatRequestError("stream_options.include_usage must be a boolean", "stream_options.include_usage")
    return True, bool(usage)


def to_job(body: Any, served: Sequence[str]) -> ChatJob:
    """The job a chat completion body asks for. ChatRequestError or UnknownModel when it cannot be served."""
    requested_model(body, served)
    check_params(body)
    turn = _user_turn(body.get("messages"))
    max_new_tokens, tokens_param = _max_tokens(body)
    stream, include_usage = _streaming(body)
    try:
        fields = task_fields(turn.text)
    except ChatRequestError as exc:
        raise ChatRequestError(exc.message, exc.param or turn.text_param, exc.code) from None
    params = {"image_uri": turn.image_param, "max_new_tokens": tokens_param, "metadata": "metadata"}
    params |= {name: turn.text_param for name in ("task", "prompt", "region", "label")}
    job_fields = {k: v for k, v in fields.items() if v is not None} | {"metadata": _metadata(body)}
    if max_new_tokens is not None:
        job_fields["max_new_tokens"] = max_new_tokens
    if stream:
        job_fields["stream"] = True
    if (constrained := body.get("varco_constrained")) is not None:
        if not isinstance(constrained, bool):
            raise ChatRequestError("varco_constrained must be true, false or null", "varco_constrained")
        job_fields["constrained"] = constrained
    try:
        request = validate_request(image_uri=turn.image_url, **job_fields)
    except InvalidRequest as exc:
        raise ChatRequestError(str(exc), params.get(exc.field or "", turn.text_param)) from None
    return ChatJob(request, params, include_usage)


def completion_usage(result: JobResult) -> CompletionUsage:
    prompt, completion = result.usage.prompt_tokens, result.usage.output_tokens
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def to_chat_completion(result: JobResult) -> ChatCompletion:
    """A succeeded job's result as a `chat.completion`: the model's text with its tags, and a `varco` object."""
    finished = result.finished_at or result.created_at or datetime.now(UTC)
    output = ParsedOutput.model_validate(result.output).model_dump(mode="json", exclude={"raw"})
    extra = VarcoExtra(
        job_id=result.job_id, task=result.task, image={"width": result.image.width, "height": result.image.height},
        output=output, cached_from=result.cached_from,
    )  # fmt: skip
    return ChatCompletion(
        id=f"chatcmpl-{result.job_id}",
        object="chat.completion",
        created=int(finished.timestamp()),
        model=result.model,
        choices=[
            Choice(
                index=0,
                finish_reason=result.finish_reason or "stop",
                message=ChatCompletionMessage(role="assistant", content=result.output.raw),
            )
        ],
        usage=completion_usage(result),
        varco=extra.model_dump(mode="json"),
    )
