"""The job request: what a producer submits and a worker receives, validated on both sides."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from varco.tasks.prompts import TaskType, build_prompt, find_control_token, find_varco_tag
from varco.tasks.tenants import DEFAULT_TENANT, check_tenant

SUPPORTED_SCHEMES = ("http", "https", "s3", "file", "data")
# The image formats a job's image may be in (Pillow's names): Pillow knows dozens more (EPS through
# Ghostscript, PSD, ICO…), each a decoder an untrusted image would reach; only these are opened.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
CALLBACK_EVENTS = ("job.started", "job.succeeded", "job.failed", "job.cancelled")
MAX_PROMPT_CHARS = 8000
MAX_LABEL_CHARS = 200
MAX_METADATA_BYTES = 16 * 1024
MAX_DEADLINE_S = 30 * 24 * 3600
MAX_METADATA_DEPTH = 16  # nesting of dicts and lists; checked without recursion, before anything walks it


class InvalidRequest(ValueError):
    """A request that can never succeed; raised at submit time, before anything is enqueued.

    `index` is the request's position in a `submit_many` batch (None for a single submit) and
    `reason` the message without that position, so callers can say where it came from; `field` names
    the first offending field when there is one (the HTTP gateway reports it).
    """

    def __init__(
        self, message: str, *, index: int | None = None, reason: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.index = index
        self.reason = reason or message
        self.field = field


class FieldError(ValueError):
    """A check across fields (a model validator) that still names the field to fix: pydantic gives such
    errors no location, so validate_request reads `field` from here."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# Numbers are taken as numbers only: "0.1" or true is a mistake to report, not a value to coerce (an int
# is a number, so region [0, 0, 1, 1] is fine; a bool is not, so max_new_tokens true is refused).
Number = Annotated[float, Strict()]
Integer = Annotated[int, Strict()]


class IdempotencyKeyReused(InvalidRequest):
    """An idempotency key already bound to a different request (`first_job_id`): as Stripe and the IETF
    Idempotency-Key draft do, a key names one request; reusing it for another is refused (gateway: 422
    `urn:varco:problem:idempotency-key-reused`), never answered with the first request's job."""

    def __init__(self, first_job_id: str, *, index: int | None = None) -> None:
        reason = (
            f"this idempotency key was first used with a different request (job {first_job_id}); "
            "send that request again to get its job, or use a new key for a new request"
        )
        where = f"request #{index}: " if index is not None else ""
        super().__init__(where + reason, index=index, reason=reason, field="idempotency_key")
        self.first_job_id = first_job_id


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image_uri: str
    task: TaskType
    prompt: str | None = None
    region: tuple[Number, Number, Number, Number] | None = None
    label: str | None = None
    callback_url: str | None = None
    callback_events: tuple[str, ...] | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    priority: Integer | None = Field(default=None, ge=0, le=9, description="0..9, higher runs sooner")
    metadata: dict[str, Any] = Field(default_factory=dict)
    max_new_tokens: Integer | None = Field(default=None, ge=1, le=8192)
    # Tag-constrained decoding for this job: true, false, or None for VARCO_CONSTRAINED_TAGS' default.
    constrained: bool | None = None
    # Who the job belongs to (fair share, limits) and the seconds after submission it must start within.
    tenant: str = DEFAULT_TENANT
    deadline_s: float | None = Field(default=None, gt=0, le=MAX_DEADLINE_S)
    # Publish the answer's text as the model writes it (tasks/deltas.py); off, the engine publishes nothing.
    stream: Annotated[bool, Strict()] = False

    @field_validator("*")
    @classmethod
    def _unicode_text(cls, value: Any, info: ValidationInfo) -> Any:
        # JSON's "\ud800" escape decodes to a lone surrogate: valid JSON, not text. Refused here, named, rather
        # than failing when the request is serialised for the worker (a 500 found by fuzzing).
        for text in value if isinstance(value, tuple) else (value,):
            if isinstance(text, str) and not is_unicode_text(text):
                raise ValueError(f"{info.field_name} holds a lone surrogate (a \\uD800-\\uDFFF escape): not text")
        return value

    @field_validator("tenant")
    @classmethod
    def _tenant_name(cls, value: str) -> str:
        return check_tenant(value)

    @field_validator("task", mode="before")
    @classmethod
    def _known_task(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in TaskType._value2member_map_:
            raise ValueError(f"unknown task {value!r}; expected one of {', '.join(t.value for t in TaskType)}")
        return value

    @field_validator("image_uri")
    @classmethod
    def _supported_uri(cls, value: str) -> str:
        scheme = urlsplit(value).scheme.lower() if ":" in value else ""
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(
                f"unsupported URI scheme {scheme or '(none)'!r}; expected one of {', '.join(SUPPORTED_SCHEMES)}"
            )
        if scheme in ("http", "https", "s3") and not urlsplit(value).netloc:
            raise ValueError(f"{scheme} URI has no host or bucket: {value[:100]!r}")
        if scheme == "s3" and not urlsplit(value).path.strip("/"):
            raise ValueError(f"s3 URI has no object key: {value[:100]!r}")
        if scheme == "file" and (urlsplit(value).netloc not in ("", "localhost") or not urlsplit(value).path):
            raise ValueError("file URI must hold an absolute path: file:///abs/path.jpg")
        if scheme == "data" and "," not in value:
            raise ValueError("data URI must look like data:image/png;base64,<payload>")
        return value

    @field_validator("prompt")
    @classmethod
    def _safe_prompt(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}")
        if (token := find_control_token(value)) is not None:
            raise ValueError(f"prompt contains the control token {token!r}, which is not allowed")
        return value

    @field_validator("label")
    @classmethod
    def _safe_label(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if len(value) > MAX_LABEL_CHARS:
            raise ValueError(f"label is {len(value)} characters; the limit is {MAX_LABEL_CHARS}")
        if (token := find_control_token(value) or find_varco_tag(value)) is not None:
            raise ValueError(f"label contains the tag {token!r}, which is not allowed")
        return value

    @field_validator("region")
    @classmethod
    def _region_in_unit_square(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is None:
            return None
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in value):
            raise ValueError(f"region {list(value)} must be four numbers in 0..1 (x1, y1, x2, y2)")
        x1, y1, x2, y2 = value
        if not (x1 < x2 and y1 < y2):
            raise ValueError(f"region {list(value)} needs x1 < x2 and y1 < y2 (top-left, then bottom-right)")
        return value

    @field_validator("callback_url")
    @classmethod
    def _http_callback(cls, value: str | None) -> str | None:
        if value is not None and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc):
            raise ValueError(f"callback_url must be an http(s) URL, got {value[:100]!r}")
        return value

    @field_validator("callback_events")
    @classmethod
    def _known_events(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (unknown := set(value) - set(CALLBACK_EVENTS)):
            raise ValueError(f"unknown callback events {sorted(unknown)}; expected some of {list(CALLBACK_EVENTS)}")
        return value

    @field_validator("metadata")
    @classmethod
    def _small_json_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if (depth := _nesting_over(value, MAX_METADATA_DEPTH)) is not None:
            raise ValueError(f"metadata is nested more than {depth} levels deep; the limit is {MAX_METADATA_DEPTH}")
        try:
            # allow_nan=False: NaN and Infinity are not JSON; stored, they would come back as null
            size = len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
        return value

    @model_validator(mode="after")
    def _task_arguments(self) -> JobRequest:
        if self.task is TaskType.VQA and not (self.prompt and self.prompt.strip()):
            raise FieldError("prompt", "task 'vqa' needs a prompt (the question to ask about the image)")
        if self.task is TaskType.REFERRING and self.region is None:
            raise FieldError("region", "task 'referring' needs a region [x1, y1, x2, y2] in 0..1")
        if self.task is not TaskType.REFERRING and (self.region is not None or self.label is not None):
            raise FieldError(
                "region" if self.region is not None else "label",
                f"region and label are only used by 'referring', not by {self.task.value!r}",
            )
        if self.task is TaskType.OCR and self.prompt is not None:
            raise FieldError("prompt", "task 'ocr' takes no prompt (the model is asked with <ocr> alone)")
        return self

    def fingerprint(self) -> str:
        """A hash of what the request asks for, stored with its idempotency key: the same request under
        the same key matches it, a different one does not. The key itself is left out (the gateway may
        take it from a header or the body), and defaults count as given."""
        asked = self.model_dump(mode="json", exclude={"idempotency_key"} | self.unset_flags())
        canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def unset_flags(self) -> set[str]:
        """Flags left off, which messages and fingerprints omit: a job that does not stream looks as before."""
        return set() if self.stream else {"stream"}

    def message_fields(self) -> dict[str, Any]:
        """The request as a job message carries it: JSON, without unset optional fields and flags."""
        return self.model_dump(mode="json", exclude_none=True, exclude=self.unset_flags())

    @property
    def model_prompt(self) -> str:
        """The user text sent to the model for this request."""
        return build_prompt(self.task, self.prompt, self.region, self.label)


def _nesting_over(value: Any, limit: int) -> int | None:
    """`limit` when dicts and lists inside `value` nest deeper than `limit` levels, else None (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list | tuple) else None
        if children is None:
            continue
        if depth > limit:
            return limit
        stack.extend((child, depth + 1) for child in children)
    return None


def data_uri_size(uri: str) -> int:
    """Bytes a data URI's payload decodes to, estimated without decoding: decoding is the worker's job,
    which fails a broken payload as an ImageDecodeError on the job."""
    header, _, payload = uri.partition(",")
    if header.lower().endswith(";base64"):
        encoded = payload.strip()
        return len(encoded) * 3 // 4 - encoded[-2:].count("=")  # "=" padding decodes to nothing
    return len(unquote_to_bytes(payload))


def is_unicode_text(text: str) -> bool:
    """Whether `text` encodes as UTF-8: no lone surrogates."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_data_uri_size(image_uri: str, max_bytes: int) -> None:
    """Broker messages stay small: an inline image over VARCO_MAX_DATA_URI_BYTES is refused (both sides check)."""
    if image_uri.startswith("data:") and (size := data_uri_size(image_uri)) > max_bytes:
        raise InvalidRequest(
            f"invalid job request: image_uri: data URI holds {size} bytes; the limit is "
            f"{max_bytes} (VARCO_MAX_DATA_URI_BYTES): upload it and send a URL",
            field="image_uri",
        )


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def validate_request(**fields: Any) -> JobRequest:
    """Build a JobRequest or raise InvalidRequest (a ValueError) saying what is wrong."""
    try:
        return JobRequest(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]  # a ValidationError holds at least one error
        cause = first.get("ctx", {}).get("error")
        field = str(first["loc"][0]) if first["loc"] else getattr(cause, "field", None)
        raise InvalidRequest(f"invalid job request: {_describe(exc)}", field=field) from None
