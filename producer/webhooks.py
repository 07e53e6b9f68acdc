"""For webhook receivers: `verify(secret, headers, body)` returns the event or raises."""

from varco.tasks.signing import WebhookVerificationError, verify

__all__ = ["WebhookVerificationError", "verify"]
