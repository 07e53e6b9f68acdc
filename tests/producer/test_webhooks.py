from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest

from varco.producer.webhooks import WebhookVerificationError, verify
from varco.tasks.signing import sign_headers

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
BODY = json.dumps({"type": "job.succeeded", "job_id": "j"}).encode()


def test_signature_is_standard_webhooks() -> None:
    headers = sign_headers(SECRET, "msg_1", BODY, timestamp=1_700_000_000)
    expected = hmac.new(b"0123456789abcdef0123456789abcdef", b"msg_1.1700000000." + BODY, hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(expected).decode()
    assert headers["webhook-id"] == "msg_1" and headers["webhook-timestamp"] == "1700000000"


def test_verify_round_trip_and_rotation() -> None:
    headers = sign_headers(SECRET, "m", BODY)
    assert verify(SECRET, headers, BODY) == {"type": "job.succeeded", "job_id": "j"}
    rotated = {**headers, "webhook-signature": "v1,b2xk " + headers["webhook-signature"]}
    assert verify(SECRET, rotated, BODY.decode())["job_id"] == "j"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h, b: ({**h, "webhook-signature": "v1,AAAA"}, b),
        lambda h, b: (h, b + b" "),
        lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b),
        lambda h, b: ({**h, "webhook-id": "other"}, b),
    ],
)
def test_verify_rejects_tampering(mutate) -> None:
    headers, body = mutate(sign_headers(SECRET, "m", BODY), BODY)
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, headers, body)


def test_verify_rejects_stale_timestamps() -> None:
    headers = sign_headers(SECRET, "m", BODY, timestamp=int(time.time()) - 3600)
    with pytest.raises(WebhookVerificationError, match="from now"):
        verify(SECRET, headers, BODY)


def test_bad_secret_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        sign_headers("whsec_***", "m", BODY)


def test_signed_headers_are_exactly_the_standard_ones() -> None:
    headers = sign_headers(SECRET, "msg_2", BODY, timestamp=1_700_000_000)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert headers["content-type"] == "application/json"
    unsigned = sign_headers(None, "msg_2", BODY, timestamp=1_700_000_000)
    assert unsigned == {"webhook-id": "msg_2", "webhook-timestamp": "1700000000", "content-type": "application/json"}


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_each_missing_header_is_refused_alone(missing: str) -> None:
    headers = {k: v for k, v in sign_headers(SECRET, "m", BODY).items() if k != missing}
    with pytest.raises(WebhookVerificationError) as info:
        verify(SECRET, headers, BODY)
    assert str(info.value) == "missing webhook-id, webhook-timestamp or webhook-signature header"


def test_header_names_are_case_insensitive() -> None:
    headers = {k.upper(): v for k, v in sign_headers(SECRET, "m", BODY).items()}
    assert verify(SECRET, headers, BODY)["job_id"] == "j"


def test_each_refusal_says_why() -> None:
    headers = sign_headers(SECRET, "m", BODY)
    with pytest.raises(WebhookVerificationError) as info:
        verify(SECRET, {**headers, "webhook-timestamp": "soon"}, BODY)
    assert str(info.value) == "bad webhook-timestamp 'soon'"
    with pytest.raises(WebhookVerificationError) as info:
        verify(SECRET, {**headers, "webhook-signature": "v1,AAAA v1,BBBB"}, BODY)
    assert str(info.value) == "no webhook-signature matches"
    not_json = b"<xml/>"
    with pytest.raises(WebhookVerificationError) as info:
        verify(SECRET, sign_headers(SECRET, "m", not_json), not_json)
    assert str(info.value) == "webhook body is not JSON"
    with pytest.raises(ValueError) as bad_secret:
        sign_headers("whsec_***", "m", BODY)
    assert str(bad_secret.value) == "callback secret must be 'whsec_' + base64 of the key bytes"


def test_the_tolerance_is_inclusive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_700_000_300.0)
    assert verify(SECRET, sign_headers(SECRET, "m", BODY, timestamp=1_700_000_000), BODY)["job_id"] == "j"
    assert verify(SECRET, sign_headers(SECRET, "m", BODY, timestamp=1_700_000_600), BODY)["job_id"] == "j"
    for off_by_one in (1_699_999_999, 1_700_000_601):
        with pytest.raises(WebhookVerificationError) as info:
            verify(SECRET, sign_headers(SECRET, "m", BODY, timestamp=off_by_one), BODY)
        assert str(info.value) == f"webhook-timestamp {off_by_one} is more than 300s from now"
