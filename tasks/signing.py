"""Standard Webhooks signatures: `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300


class WebhookVerificationError(ValueError):
    """The webhook is not authentic: missing headers, stale timestamp or bad signature."""


def secret_key(secret: str) -> bytes:
    """The key bytes of a `whsec_<base64>` secret (a bare base64 string is accepted too)."""
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("callback secret must be 'whsec_' + base64 of the key bytes") from exc


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_headers(secret: str | None, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "content-type": "application/json"}
    if secret:
        headers["webhook-signature"] = signature(secret, msg_id, ts, body)
    return headers


def verify(
    secret: str, headers: Mapping[str, str], body: bytes | str, *, tolerance_s: int = DEFAULT_TOLERANCE_S
) -> dict[str, Any]:
    """Check a received webhook and return its JSON payload; raise WebhookVerificationError if not authentic."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, ts, sigs = lower.get("webhook-id"), lower.get("webhook-timestamp"), lower.get("webhook-signature")
    if not (msg_id and ts and sigs):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(ts)
    except ValueError:
        raise WebhookVerificationError(f"bad webhook-timestamp {ts!r}") from None
    if abs(time.time() - timestamp) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp {timestamp} is more than {tolerance_s}s from now")
    raw = body.encode() if isinstance(body, str) else body
    expected = signature(secret, msg_id, timestamp, raw)
    # Several space-separated signatures may be sent during secret rotation; any one may match.
    if not any(hmac.compare_digest(expected, candidate) for candidate in sigs.split()):
        raise WebhookVerificationError("no webhook-signature matches")
    try:
        return json.loads(raw)
    except ValueError:
        raise WebhookVerificationError("webhook body is not JSON") from None
