"""One redaction for the worker's log lines and the gateway's access log: no URL secret reaches a log."""

from __future__ import annotations

import json
import logging

import pytest

from varco.tasks.redaction import redact_text

PRESIGNED = "https://bucket.s3.amazonaws.com/a.png?X-Amz-Credential=AKIA&X-Amz-Signature=topsecret"


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (f"GET {PRESIGNED} 200", "GET https://bucket.s3.amazonaws.com/a.png?[redacted] 200"),
        ("fetch S3://b/k.png?versionId=7 and http://h/x?a=1#frag", "fetch S3://b/k.png?[redacted] and http://h/x?[redacted]#frag"),
        ("GET /ui/jobs/abc?key=alice-key&page=2 HTTP/1.1", "GET /ui/jobs/abc?key=[redacted]&page=2 HTTP/1.1"),
        ("/v1/jobs/x/events?lang=en&TOKEN=t0k", "/v1/jobs/x/events?lang=en&TOKEN=[redacted]"),
        ("/v1/jobs?monkey=1&tokens=2", "/v1/jobs?monkey=1&tokens=2"),  # only the parameters named key and token
        ("no url here: a?b, key=value", "no url here: a?b, key=value"),
        # a percent-encoded name is the same parameter to Starlette, so to the access log too
        ("GET /ui/jobs/abc?%6Bey=keyA&page=2", "GET /ui/jobs/abc?%6Bey=[redacted]&page=2"),
        ("GET /v1/jobs/x/events?%74oken=t0k", "GET /v1/jobs/x/events?%74oken=[redacted]"),
        ("GET /v1/jobs/x/events?%2574%256Fken=t0k", "GET /v1/jobs/x/events?%2574%256Fken=[redacted]"),
        # userinfo, whatever the scheme, and with the query of the same URL
        ("HTTP 404 fetching http://alice:S3cretPassw0rd@h:80/missing.png?X-Amz-Signature=abc",
         "HTTP 404 fetching http://[redacted]@h:80/missing.png?[redacted]"),
        ("callback to https://bob@hooks.example/in refused", "callback to https://[redacted]@hooks.example/in refused"),
        ("redis://:pw@redis:6379/0 and ftp://u:p@w@h/f", "redis://[redacted]@redis:6379/0 and ftp://[redacted]@h/f"),
        ("mail ops@example.com about http://h/a@b", "mail ops@example.com about http://h/a@b"),  # no userinfo
        # an inline image by its header only: never its payload (in a span's error, a log line)
        ("HTTP 503 fetching data:image/png;base64,iVBORw0KGgo= now", "HTTP 503 fetching data:image/png;base64,… now"),
        ("'data:,hello' and metadata:a,b", "'data:,…' and metadata:a,b"),
    ],
)  # fmt: skip
def test_query_strings_of_urls_and_key_or_token_values_are_redacted(text: str, redacted: str) -> None:
    assert redact_text(text) == redacted


def test_a_json_log_line_stays_json() -> None:
    line = json.dumps({"message": f"posted to /hook?token=abc and {PRESIGNED}", "level": "INFO"})
    record = json.loads(redact_text(line))
    assert record == {"message": "posted to /hook?token=[redacted] and https://bucket.s3.amazonaws.com/a.png?[redacted]",
                      "level": "INFO"}  # fmt: skip


def test_the_worker_log_and_the_gateway_access_log_redact_the_same_way() -> None:
    from varco.gateway.server import RedactSecrets
    from varco.workers.logs import RedactingFormatter

    message = f"callback to /hook?token=abc for {PRESIGNED}"
    worker_line = RedactingFormatter(logging.Formatter("%(message)s")).format(
        logging.LogRecord("httpx", logging.INFO, __file__, 1, message, None, None)
    )
    access = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%s %s", ("GET", message), None)
    assert RedactSecrets().filter(access)
    assert worker_line == access.getMessage().removeprefix("GET ") == redact_text(message)
    assert "abc" not in worker_line and "topsecret" not in worker_line


def test_error_messages_lose_url_secrets_wherever_they_are_made() -> None:
    """`error.message` is kept in the status record and sent in `job.failed` webhooks: an image URL's
    password or presigned query never reaches either."""
    from varco.tasks.errors import ImageFetchError, error_info
    from varco.tasks.schemas import ErrorInfo

    url = "http://alice:S3cretPassw0rd@host/missing.png?X-Amz-Signature=abc"
    for info in (ImageFetchError(f"HTTP 404 fetching {url}").info(), error_info(OSError(f"cannot open {url}")),
                 ErrorInfo(type="ImageFetchError", message=url)):  # fmt: skip
        assert "S3cretPassw0rd" not in info.message and "alice" not in info.message and "abc" not in info.message
        assert "http://[redacted]@host/missing.png?[redacted]" in info.message
