"""Typed job errors. Their class names are what users see as `error.type` in status and callbacks."""

from __future__ import annotations

from varco.tasks.schemas import ErrorInfo


class JobError(Exception):
    """A failure of one job. `transient` failures are retried with backoff before the job fails."""

    transient: bool = False

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient

    def info(self) -> ErrorInfo:
        return ErrorInfo(type=type(self).__name__, message=str(self))


class ImageFetchError(JobError):
    """The image could not be read from its URI (404, timeout, S3 unreachable, file outside the root…)."""


class ForbiddenURLError(ImageFetchError):
    """The URI points at a loopback, private or link-local address and private URLs are not allowed."""


class ImageTooLargeError(ImageFetchError):
    """The image is over VARCO_MAX_IMAGE_BYTES or VARCO_MAX_IMAGE_PIXELS."""


class ImageDecodeError(JobError):
    """The bytes are not an image Pillow can decode (or the data URI is broken)."""


class InferenceError(JobError):
    """The model failed on this job (not on its batch mates: a failed batch is retried one by one)."""


class PoisonMessageError(JobError):
    """The job was delivered more than VARCO_MAX_ATTEMPTS times (a worker crashed or ran out of memory on it)."""


class DeadlineExceeded(JobError):
    """The job was not started within its `deadline_s` (or VARCO_DEFAULT_DEADLINE_S) of submission; it never ran."""


class ResultStoreError(JobError):
    """The result could not be written to VARCO_RESULT_STORE."""

    transient = True


def error_info(exc: BaseException) -> ErrorInfo:
    """What users see for any exception; unexpected ones keep their class name."""
    if isinstance(exc, JobError):
        return exc.info()
    return ErrorInfo(type=type(exc).__name__, message=str(exc) or repr(exc))
