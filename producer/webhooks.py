"""For webhook receivers: `verify(secret, headers, body)` returns the event or raises."""

from tasks.signing import WebhookVerificationError, verify

__all__ = ["WebhookVerificationError", "verify"]
