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
