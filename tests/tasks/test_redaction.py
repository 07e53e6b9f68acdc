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
