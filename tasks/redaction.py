"""One redaction for URL secrets in any text that leaves a process: log lines (worker, callback process,
gateway access log), job error messages (kept in status records, sent in webhooks), Celery's task repr.

Four things are cut:
- the userinfo of every absolute URL, whatever its scheme (`http://[redacted]@host/…`): a password in an
  image or callback URL;
- the query string of every absolute URL, whole: a presigned URL's signature is in it
  (`https://bucket.s3…/a.png?[redacted]`); httpx logs every request's URL, Celery a task's arguments;
- the value of a secret query parameter (`key`, `token`, …) wherever it stands, for paths without a
  scheme such as the gateway's access log (`/ui/jobs/…?key=[redacted]`). The name is compared
  percent-decoded: Starlette reads `?%6Bey=…` as `key`, so the log must too;
- the payload of an inline `data:` URI (`data:image/png;base64,…`): an image is no log line's business.

A value ends at whitespace, a quote or a bracket as well, so a JSON log line stays JSON.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

__all__ = ["REDACTED", "redact_text", "redact_uri", "redact_value"]

REDACTED = "[redacted]"

# Names whose values are credentials: the gateway's own (`key`, `token`) and common ones in signed URLs.
SECRET_PARAMS = frozenset(
    {"key", "token", "api_key", "apikey", "access_token", "password", "signature", "sig",
     "x-amz-signature", "x-amz-credential", "x-amz-security-token"}
)  # fmt: skip

_STOP = r"\s\"'<>"  # where a URL ends in a log line
_SCHEME = r"[a-z][a-z0-9+.-]*://"
_USERINFO = re.compile(rf"({_SCHEME})[^/?#@{_STOP}]*(?:@[^/?#@{_STOP}]*)*@", re.IGNORECASE)
_URL_QUERY = re.compile(rf"({_SCHEME}[^?#{_STOP}]+)\?[^#{_STOP}]*", re.IGNORECASE)
_PARAM = re.compile(rf"([?&;])([^=&#{_STOP}]+)=([^&#{_STOP}]*)")
# An inline image's payload (`data:image/png;base64,iVBOR…`): its header stays, as in a result's image.uri.
_DATA_PAYLOAD = re.compile(rf"\b(data:[^,{_STOP}]{{0,200}}),[^{_STOP}]+", re.IGNORECASE)


def _param_name(raw: str) -> str:
    """The name as a server reads it: percent-decoded (twice over is no disguise either), lower case."""
    for _ in range(3):
        decoded = unquote_plus(raw)
        if decoded == raw:
            break
        raw = decoded
    return raw.strip().lower()


def _redact_param(match: re.Match[str]) -> str:
    sep, name, _value = match.groups()
    return f"{sep}{name}={REDACTED}" if _param_name(name) in SECRET_PARAMS else match.group(0)


def redact_text(text: str) -> str:
    """`text` with every URL's userinfo and query string, and every secret parameter's value, replaced by
    `[redacted]`, and every `data:` URI's payload by `…`."""
    text = _DATA_PAYLOAD.sub("\\1,…", text)
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _URL_QUERY.sub(rf"\1?{REDACTED}", text)
    return _PARAM.sub(_redact_param, text)


def redact_value(value: Any) -> Any:
    """`value` with `redact_text` applied to every string inside lists, tuples and dicts (keys too): task
    arguments are redacted before they are shortened to a repr, so a cut never leaves half a secret."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_value(k): redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value


def redact_uri(uri: str) -> str:
    """An image URI as a span attribute or a log may show it: a `data:` URI by its header only (never its
    payload), any other with its query string cut."""
    return uri.partition(",")[0] + ",…" if uri.startswith("data:") else redact_text(uri)
