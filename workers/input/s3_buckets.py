"""Which buckets `s3://` image URIs may name (VARCO_S3_BUCKETS).

The worker's S3 credentials usually reach more than images (results, other teams' data); without an
allow-list any producer could have the worker read any of it into a job (a confused deputy).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from varco.tasks.errors import ForbiddenURLError


def check_s3_bucket(uri: str, allowed: list[str]) -> None:
    """Raise ForbiddenURLError unless the URI's bucket is listed (or the list is `*`)."""
    bucket = urlsplit(uri).netloc
    if "*" in allowed or bucket in allowed:
        return
    if not allowed:
        raise ForbiddenURLError("s3:// image URIs are disabled: set VARCO_S3_BUCKETS to the buckets they may read")
    raise ForbiddenURLError(f"bucket {bucket!r} is not in VARCO_S3_BUCKETS ({', '.join(allowed)})")
