"""Webhook delivery: the `varco.callbacks` task of the callback process, so a GPU never waits on HTTP.

Each event is POSTed as JSON, signed the Standard Webhooks way (a fresh timestamp per attempt,
the same `webhook-id` across retries so receivers can deduplicate), and retried with exponential
backoff on network errors, 5xx, 408, 425 and 429. A dead receiver never blocks or fails the job.

Two tasks share one attempt (`attempt` below): `varco.callback` delivers one event (and every retry), and
`varco.callback.batch` the events a worker queued together: one MGET of the delivered log for all, their
POSTs at once (per receiver host within its cap), one pipeline of SETs for those delivered; an event that
must be tried again goes back alone as a `varco.callback` message, with the countdown and retry count
the single task would have given it.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import redis
from celery import Celery, Task

from varco.tasks import keys, tracing
from varco.tasks.celery_app import CALLBACK_BATCH_TASK, CALLBACK_TASK
from varco.tasks.errors import ForbiddenURLError
from varco.tasks.redaction import redact_uri
from varco.tasks.settings import Settings
from varco.tasks.signing import sign_headers
from varco.workers.metrics import CALLBACKS
from varco.workers.net.netguard import UnresolvableHostError
from varco.workers.net.pinned_http import pinned_client, total_deadline
from varco.workers.net.retry import backoff_s, is_retryable_status, spread_s
from varco.workers.output.host_slots import HostSlots, host_of
from varco.workers.output.webhooks import WebhookItem

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

    def seen_many(self, msg_ids: Sequence[str]) -> list[bool]:
        """`seen` for each id, in one MGET."""
        if not msg_ids:
            return []
        try:
            return [value is not None for value in self.client.mget([self._key(m) for m in msg_ids])]
        except redis.RedisError:
            return [False] * len(msg_ids)

    def mark(self, msg_id: str) -> None:
        self.mark_many([msg_id])

    def mark_many(self, msg_ids: Sequence[str]) -> None:
        """`mark` for each id: one SET, or a pipeline of them (one round trip)."""
        if not msg_ids:
            return
        try:
            if len(msg_ids) == 1:
                self.client.set(self._key(msg_ids[0]), "1", ex=self.ttl)
                return
            pipe = self.client.pipeline(transaction=False)
            for msg_id in msg_ids:
                pipe.set(self._key(msg_id), "1", ex=self.ttl)
            pipe.execute()
        except redis.RedisError:
            for msg_id in msg_ids:
                log.warning("could not record webhook %s as delivered; a redelivery may send it again", msg_id)


@dataclass(frozen=True)
class Attempt:
    """How one POST went: `outcome` is the callbacks metric's label ("delivered", "rejected", "retry",
    "refused", or "deferred": the host was at its cap and nothing was sent); `status` the HTTP answer
    (0 for none); `error` the network error of a "retry" without an answer."""

    outcome: str
    status: int = 0
    error: BaseException | None = None


# Threads of one batch task: its POSTs run at once, each receiver host's within its cap.
BATCH_THREADS = 8


def register_callback_task(app: Celery, settings: Settings, delivered: DeliveredLog | None = None) -> Task:
    """Register `varco.callback` (returned) and `varco.callback.batch` on `app`."""
    secret = settings.callback_secret.get_secret_value() if settings.callback_secret else None
    if secret is None:
        log.warning("VARCO_CALLBACK_SECRET is not set: webhooks are sent unsigned")
    # Connections go only to checked addresses; each attempt has one deadline for connect, headers and
    # body, and each receiver host at most callback_host_concurrency attempts at a time, so a slow or
    # hanging receiver delays only its own webhooks.
    timeout_s = settings.callback_timeout_s
    http = pinned_client(settings.allow_private_urls, httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)))
    slots = HostSlots(settings.callback_host_concurrency)
    max_retries = settings.callback_max_retries

    def attempt(url: str, payload: dict[str, Any], msg_id: str, carrier: dict[str, str], retries: int) -> Attempt:
        """One POST of one event, `retries` attempts before it; never raises, never retries by itself."""
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        host = host_of(url)
        # One span per attempt, a child of the job's span (the carrier); its own context goes on the POST,
        # so the receiver's trace continues the job's.
        attributes = {
            "http.request.method": "POST", "url.full": redact_uri(url), "server.address": host,
            "http.request.resend_count": retries or None, "varco.job_id": payload.get("job_id"),
            "varco.task": payload.get("task"), "varco.tenant": payload.get("tenant"),
            "varco.webhook.event": payload.get("type"), "varco.webhook.id": msg_id,
        }  # fmt: skip
        with tracing.span("POST", attributes, kind="client", parent=tracing.context_of(carrier)) as span:
            result = _post(url, body, msg_id, host, span, retries)
            if result.outcome == "retry":
                # A failed attempt is an error span (OpenTelemetry's HTTP client rule: the status as error.type).
                tracing.record_error(span, result.error, error_type=None if result.error else str(result.status),
                                     message=f"HTTP {result.status}")  # fmt: skip
            return result

    def _post(url: str, body: bytes, msg_id: str, host: str, span: Any, retries: int) -> Attempt:
        if not slots.try_acquire(host):
            log.debug("callback %s: %s is busy; put back", msg_id, host)
            CALLBACKS.labels(outcome="deferred").inc()
            return Attempt("deferred")
        try:
            with total_deadline(timeout_s):
                headers = sign_headers(secret, msg_id, body) | tracing.inject()
                response = http.post(url, content=body, headers=headers)
        except ForbiddenURLError as exc:
            log.error("callback %s to %s refused: %s", msg_id, url, exc)
            CALLBACKS.labels(outcome="refused").inc()
            return Attempt("refused")
        except (httpx.HTTPError, UnresolvableHostError) as exc:  # a DNS failure is transient too
            log.info("callback %s to %s failed (%r); retry %d", msg_id, url, exc, retries + 1)
            CALLBACKS.labels(outcome="retry").inc()
            return Attempt("retry", error=exc)
        finally:
            slots.release(host)
        outcome = delivery_outcome(response.status_code)
        span.set_attribute("http.response.status_code", response.status_code)
        CALLBACKS.labels(outcome=outcome).inc()
        if outcome == "retry":
            log.info("callback %s got HTTP %d; retry %d", msg_id, response.status_code, retries + 1)
        elif outcome == "rejected":
            log.warning("callback %s to %s refused with HTTP %d; not retried", msg_id, url, response.status_code)
        return Attempt(outcome, response.status_code)

    # shared=False: Celery would otherwise add these closures (this app's settings and log) to every app the
    # process finalizes later, ahead of that app's own registration (which it then ignores).
    @app.task(name=CALLBACK_TASK, bind=True, max_retries=max_retries, acks_late=True, shared=False)
    def deliver(self: Task, url: str, payload: dict[str, Any], msg_id: str) -> int:
        if delivered is not None and delivered.seen(msg_id):
            log.info("callback %s was delivered already; not sent again", msg_id)
            CALLBACKS.labels(outcome="duplicate").inc()
            return 0
        # Celery keeps a message's custom headers in request.headers (a retry republishes them: same trace),
        # and as request attributes too.
        given = self.request.headers if isinstance(self.request.headers, dict) else {}
        carrier = {k: v for k in tracing.TRACE_HEADERS
                   if isinstance(v := given.get(k, getattr(self.request, k, None)), str)}  # fmt: skip
        retries = self.request.retries or 0
        result = attempt(url, payload, msg_id, carrier, retries)
        if result.outcome == "deferred":  # the host is at its cap: put the delivery back, keeping its retry count
            self.signature_from_request(countdown=spread_s(), retries=retries).apply_async()
            return 0
        if result.outcome == "retry":
            raise self.retry(countdown=backoff_s(retries), exc=result.error) from None
        if result.outcome == "delivered" and delivered is not None:
            delivered.mark(msg_id)
        return result.status

    def resend(item: WebhookItem, *, countdown: float, retries: int) -> None:
        """One event of a batch, back on the queue alone: what the single task's retry or put-back publishes."""
        deliver.apply_async(
            args=[item.url, item.payload, item.msg_id], countdown=countdown, retries=retries, headers=item.trace or None
        )

    @app.task(name=CALLBACK_BATCH_TASK, bind=True, acks_late=True, shared=False)
    def deliver_batch(self: Task, items: list[dict[str, Any]]) -> list[int]:
        batch = [WebhookItem.model_validate(item) for item in items]
        seen = delivered.seen_many([i.msg_id for i in batch]) if delivered is not None else [False] * len(batch)
        statuses = [0] * len(batch)
        todo = [n for n, was in enumerate(seen) if not was]
        for n in set(range(len(batch))) - set(todo):
            log.info("callback %s was delivered already; not sent again", batch[n].msg_id)
            CALLBACKS.labels(outcome="duplicate").inc()
        # A queue per receiver host, served by as many lanes as the host's cap: a batch's events to one
        # receiver go one after another in each lane, not put back for being over the cap. A lane starts
        # no event after the batch has run for one attempt's timeout (a slow receiver): those are put back.
        queues: dict[str, deque[int]] = {}
        for n in todo:
            queues.setdefault(host_of(batch[n].url), deque()).append(n)
        lanes = [q for q in queues.values() for _ in range(min(slots.per_host, len(q)))]
        deadline = time.monotonic() + timeout_s
        done: list[str] = []

        def lane(queue: deque[int]) -> None:
            while True:
                try:
                    n = queue.popleft()
                except IndexError:
                    return
                item = batch[n]
                if time.monotonic() > deadline:
                    CALLBACKS.labels(outcome="deferred").inc()
                    resend(item, countdown=spread_s(), retries=0)
                    continue
                result = attempt(item.url, item.payload, item.msg_id, item.trace, 0)
                statuses[n] = result.status
                if result.outcome == "delivered":
                    done.append(item.msg_id)
                elif result.outcome == "deferred":
                    resend(item, countdown=spread_s(), retries=0)
                elif result.outcome == "retry":
                    if max_retries < 1:
                        log.warning("callback %s: no retries left; not sent", item.msg_id)
                    else:
                        resend(item, countdown=backoff_s(0), retries=1)

        try:
            run_lanes(lane, lanes)
        finally:  # a lane that failed (the broker away for a put-back) loses no other lane's marks
            if delivered is not None:
                delivered.mark_many(done)
        return statuses

    return deliver


def run_lanes(lane: Callable[[deque[int]], None], lanes: list[deque[int]]) -> None:
    """Each lane in a thread of its own (up to BATCH_THREADS), or in this one when there is only one."""
    if len(lanes) <= 1:
        for queue in lanes:
            lane(queue)
        return
    with ThreadPoolExecutor(min(BATCH_THREADS, len(lanes)), thread_name_prefix="webhook") as pool:
        for future in [pool.submit(lane, queue) for queue in lanes]:
            future.result()
