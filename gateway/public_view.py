"""What a gateway caller sees of a job: gateway URLs, never the worker's or the store's own addresses.

A status record's `result_uri` and a result's `image.kept_uri` name objects in VARCO_RESULT_STORE
(`s3://…`, or `file:///…` on the worker's disk): a gateway caller holds no store credentials and must
not learn the worker's paths, so they become the gateway routes that serve the same bytes. A `model`
that is a local directory becomes its last component (the model's name without the worker's layout);
a hub id stays as it is. `Client` callers, inside, keep the store URIs.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import urlsplit

from varco.tasks.schemas import JobResult, JobStatus


def result_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/result"


def image_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/image"


def public_model(model: str) -> str:
    """A local model directory as its name (`/srv/models/varco-14b/` -> `varco-14b`); a hub id unchanged."""
    if model.startswith("file:"):
        model = urlsplit(model).path
    if model.startswith(("/", "./", "../", "~")) or "\\" in model:
        return PurePosixPath(model.replace("\\", "/").rstrip("/")).name or model
    return model


def public_status(status: JobStatus) -> JobStatus:
    return status.model_copy(update={"result_uri": result_url(status.job_id) if status.result_uri else None})


def public_result(result: JobResult) -> JobResult:
    image = result.image.model_copy(update={"kept_uri": image_url(result.job_id) if result.image.kept_uri else None})
    return result.model_copy(update={"image": image, "model": public_model(result.model)})
