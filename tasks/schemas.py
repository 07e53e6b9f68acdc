"""Pydantic models at the boundaries: what the model's output parses into, and what a job is.

These are the public contracts of DESIGN.md; producers and workers both import them from here.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from varco.tasks.redaction import redact_text

# Normalised box (x1, y1, x2, y2) in 0..1, (x1, y1) top-left; pixel box in original-image pixels.
Box = tuple[float, float, float, float]
PixelBox = tuple[int, int, int, int]


class ParsedObject(BaseModel):
    """A phrase the model tied to one or more regions: `<obj>label</obj><bbox>…</bbox>`."""

    label: str
    span: tuple[int, int] = Field(description="[start, end) of the phrase in output.text")
    boxes: list[Box] = Field(default_factory=list)
    boxes_px: list[PixelBox] | None = None


class OcrItem(BaseModel):
    """One recognised text: `<char>text</char><bbox>…</bbox>` (one item per box)."""

    text: str
    box: Box
    box_px: PixelBox | None = None


class ParsedOutput(BaseModel):
    """The `output` object of a result: the raw model text and what the tag parser made of it."""

    raw: str
    text: str
    objects: list[ParsedObject] = Field(default_factory=list)
    ocr: list[OcrItem] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


FINISHED_RANK = 2
"""The rank of the three states a job ends in; nothing moves a job out of them."""


class JobState(StrEnum):
    """Where a job stands. It only moves forward in `rank` order: the Lua scripts of tasks/status.py refuse any
    other move (their rank table is made from this one), and readers use the same order to drop stale news."""

    QUEUED = "queued"
    """Submitted, waiting for a worker."""
    STARTED = "started"
    """A worker is running it."""
    RETRYING = "retrying"
    """A transient failure; it runs again (`error` says why). Alternates with started."""
    SUCCEEDED = "succeeded"
    """Finished with a result (`result_uri`)."""
    FAILED = "failed"
    """Finished without one (`error` says why)."""
    CANCELLED = "cancelled"
    """Finished by a cancel."""

    @property
    def rank(self) -> int:
        """0 queued, 1 started or retrying, FINISHED_RANK for the end states."""
        return _STATE_RANKS[self]

    @property
    def finished(self) -> bool:
        return self.rank == FINISHED_RANK


_STATE_RANKS: dict[JobState, int] = {
    JobState.QUEUED: 0,
    JobState.STARTED: 1,
    JobState.RETRYING: 1,
    JobState.SUCCEEDED: FINISHED_RANK,
    JobState.FAILED: FINISHED_RANK,
    JobState.CANCELLED: FINISHED_RANK,
}


class ErrorInfo(BaseModel):
    """A failure as users see it: the error's type name and a message that says what went wrong.

    The message is redacted here, once, so no URL secret (an image URL's password or presigned query)
    reaches the status record, a `job.failed` webhook or a log line, wherever the error was made."""

    type: str
    message: Annotated[str, AfterValidator(redact_text)]


class JobStatus(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: str
    state: JobState
    task: str | None = None
    error: ErrorInfo | None = None
    attempts: int = 0
    result_uri: str | None = None
    worker: str | None = None
    tenant: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None


class ImageInfo(BaseModel):
    uri: str
    width: int
    height: int
    sha256: str
    # Where the worker kept the image bytes it fetched (VARCO_KEEP_IMAGES), for overlays; None: not kept.
    kept_uri: str | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    output_tokens: int = 0


class Timings(BaseModel):
    queued_s: float = 0.0
    fetch_s: float = 0.0
    inference_s: float = 0.0
    total_s: float = 0.0


class JobResult(BaseModel):
    """The result object stored as JSON at `{VARCO_RESULT_STORE}{job_id}.json`."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    task: str
    state: JobState
    model: str
    prompt: str
    image: ImageInfo
    output: ParsedOutput
    usage: Usage = Field(default_factory=Usage)
    # Why generation ended: "stop" (the model ended its answer) or "length" (max_new_tokens); None in
    # results written before this field existed.
    finish_reason: Literal["stop", "length"] | None = None
    timings: Timings = Field(default_factory=Timings)
    worker: str | None = None
    tenant: str | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    # referring: the asked region (0..1) and its label, as submitted, so the result alone can show it.
    region: Box | None = None
    label: str | None = None
    # Answered from the result cache (VARCO_RESULT_CACHE_TTL): the job whose result this repeats.
    cached_from: str | None = None


class WebhookEvent(BaseModel):
    """The JSON body of a webhook: enough for a receiver to act without looking the job up."""

    type: Literal["job.started", "job.succeeded", "job.failed", "job.cancelled"]
    job_id: str
    task: str
    state: JobState
    result_uri: str | None = None
    error: ErrorInfo | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)  # as submitted
    tenant: str | None = None
    timestamp: str
