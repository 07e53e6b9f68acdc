"""Webhook delivery: the `varco.callbacks` task of the callback process, so a GPU never waits on HTTP.

Each event is POSTed as JSON, signed the Standard Webhooks way (a fresh timestamp per attempt,
the same `webhook-id` across retries so receivers can deduplicate), and retried with exponential
backoff on network errors, 5xx, 408, 425 and 429. A dead receiver never blocks or fails the job.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import redis
from celery import Celery, Task

from varco.tasks import keys, tracing
from varco.tasks.celery_app import CALLBACK_TASK
from varco.tasks.errors import ForbiddenURLError
from varco.tasks.redaction import redact_uri
from varco.tasks.settings import Settings
from varco.tasks.signing import sign_headers
from varco.workers.metrics import CALLBACKS
from varco.workers.net.netguard import UnresolvableHostError
from varco.workers.net.pinned_http import pinned_client, total_deadline
from varco.workers.net.retry import backoff_s, is_retryable_status, spread_s
from varco.workers.output.host_slots import HostSlots, host_of

log = logging.getLogger(__name__)


def delivery_outcome(status: int) -> str:
    """What a receiver's HTTP answer means for a delivery, named as the callbacks metric's outcome label.

    "retry": 5xx, 408, 425 and 429, which a later attempt may get through; "rejected": any other
    answer from 300 up (a redirect is not followed), which would only be refused again; "delivered": 2xx.
    """
    if is_retryable_status(status):
        return "retry"
    return "rejected" if status >= 300 else "delivered"


class DeliveredLog:
    """Webhook ids already delivered, as Redis keys that live `ttl` seconds. A delivery whose POST went
    through but whose ack was lost (a Redis restart) comes back from the broker: it is not POSTed again.
    Redis errors never stop a delivery: then it is sent (at least once; receivers deduplicate on
    `webhook-id`)."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.client, self.ttl = client, ttl

    def _key(self, msg_id: str) -> str:
        return keys.webhook_delivered(msg_id)

    def seen(self, msg_id: str) -> bool:
        try:
            return bool(self.client.exists(self._key(msg_id)))
        except redis.RedisError:
            return False

    def mark(self, msg_id: str) -> None:
        try:
            self.client.set(self._key(msg_id), "1", ex=self.ttl)
        except redis.RedisError:
            log.warning("could not record webhook %s as delivered; a redelivery may send it again", msg_id)


def register_callback_task(app: Celery, settings: Settings, delivered: DeliveredLog | None = None) -> Task:
    secret = settings.callback_secret.get_secret_value() if settings.callback_secret else None
    if secret is None:
        log.warning("VARCO_CALLBACK_SECRET is not set: webhooks are sent unsigned")
    # Connections go only to checked addresses; each attempt has one deadline for connect, headers and
    # body, and each receiver host at most callback_host_concurrency attempts at a time, so a slow or
    # hanging receiver delays only its own webhooks.
    timeout_s = settings.callback_timeout_s
    http = pinned_client(settings.allow_private_urls, httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)))
    slots = HostSlots(settings.callback_host_concurrency)

    @app.task(name=CALLBACK_TASK, bind=True, max_retries=settings.callback_max_retries, acks_late=True)
    def deliver(self: Task, url: str, payload: dict[str, Any], msg_id: str) -> int:
        if delivered is not None and delivered.seen(msg_id):
            log.info("callback %s was delivered already; not sent again", msg_id)
            CALLBACKS.labels(outcome="duplicate").inc()
            return 0
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        host = host_of(url)
        # One span per attempt, a child of the job's span (the message's traceparent); its own context goes
        # on the POST, so the receiver's trace continues the job's.
        # Celery keeps a message's custom headers in request.headers (a retry republishes them: same trace),
        # and as request attributes too.
        given = self.request.headers if isinstance(self.request.headers, dict) else {}
        carrier = {k: v for k in tracing.TRACE_HEADERS
                   if isinstance(v := given.get(k, getattr(self.request, k, None)), str)}  # fmt: skip
        attributes = {
            "http.request.method": "POST", "url.full": redact_uri(url), "server.address": host,
            "http.request.resend_count": self.request.retries or None, "varco.job_id": payload.get("job_id"),
            "varco.task": payload.get("task"), "varco.tenant": payload.get("tenant"),
            "varco.webhook.event": payload.get("type"), "varco.webhook.id": msg_id,
        }  # fmt: skip
        with tracing.span("POST", attributes, kind="client", parent=tracing.context_of(carrier)) as span:
            return _post(self, url, body, msg_id, host, span)

    def _post(self: Task, url: str, body: bytes, msg_id: str, host: str, span: Any) -> int:
        if not slots.try_acquire(host):
            # The host is at its cap: put the delivery back for later, keeping its retry count.
            log.debug("callback %s: %s is busy; put back", msg_id, host)
            CALLBACKS.labels(outcome="deferred").inc()
            self.signature_from_request(countdown=spread_s(), retries=self.request.retries).apply_async()
            return 0
        try:
            with total_deadline(timeout_s):
                headers = sign_headers(secret, msg_id, body) | tracing.inject()
                response = http.post(url, content=body, headers=headers)
        except ForbiddenURLError as exc:
            log.error("callback %s to %s refused: %s", msg_id, url, exc)
            CALLBACKS.labels(outcome="refused").inc()
            return 0
        except (httpx.HTTPError, UnresolvableHostError) as exc:  # a DNS failure is transient too
            log.info("callback %s to %s failed (%r); retry %d", msg_id, url, exc, self.request.retries + 1)
            CALLBACKS.labels(outcome="retry").inc()
            raise self.retry(countdown=backoff_s(self.request.retries), exc=exc) from None
        finally:
            slots.release(host)
        outcome = delivery_outcome(response.status_code)
        span.set_attribute("http.response.status_code", response.status_code)
        CALLBACKS.labels(outcome=outcome).inc()
        if outcome == "retry":
            log.info("callback %s got HTTP %d; retry %d", msg_id, response.status_code, self.request.retries + 1)
            raise self.retry(countdown=backoff_s(self.request.retries))
        if outcome == "rejected":
            log.warning("callback %s to %s refused with HTTP %d; not retried", msg_id, url, response.status_code)
        elif delivered is not None:
            delivered.mark(msg_id)
        return response.status_code

    return deliver
