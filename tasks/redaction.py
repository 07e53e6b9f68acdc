"""One redaction for text bound for a log: no URL secret reaches a log line, worker's or gateway's.

Two things are cut from any text:
- the query string of every absolute http(s) or s3 URL, whole: a presigned URL's signature is in it
  (`https://bucket.s3…/a.png?[redacted]`); httpx logs every request's URL, Celery a task's arguments;
- the value of a `key=` or `token=` query parameter wherever it stands, for paths without a scheme
  such as the gateway's access log (`/ui/jobs/…?key=[redacted]`).

A value ends at whitespace, a quote or a bracket as well, so a JSON log line stays JSON.
"""

from __future__ import annotations

import re

__all__ = ["redact_text", "redact_uri"]

_URL_QUERY = re.compile(r"((?:https?|s3)://[^\s?#\"'<>]+)\?[^\s#\"'<>]*", re.IGNORECASE)
_SECRET_PARAM = re.compile(r"([?&](?:key|token)=)[^&\s#\"'<>]*", re.IGNORECASE)


def redact_text(text: str) -> str:
    """`text` with every URL's query string and every `key=`/`token=` value replaced by `[redacted]`."""
    return _SECRET_PARAM.sub(r"\1[redacted]", _URL_QUERY.sub(r"\1?[redacted]", text))


def redact_uri(uri: str) -> str:
    """An image URI as a span attribute or a log may show it: a `data:` URI by its header only (never its
    payload), any other with its query string cut."""
    return uri.partition(",")[0] + ",…" if uri.startswith("data:") else redact_text(uri)
