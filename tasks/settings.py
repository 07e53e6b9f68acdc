"""Settings: one pydantic-settings class, every name read from the environment with prefix VARCO_."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from varco.tasks.brokers import is_amqp
from varco.tasks.tenants import parse_weights


def _default_result_store() -> str:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return (base / "varco-queue" / "results").as_uri() + "/"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VARCO_", extra="ignore")

    broker_url: str = "redis://127.0.0.1:6379/0"
    # The Redis of status records, events, leases and the fair queue (same URL forms as a Redis broker URL).
    # Unset: the broker URL, which must then be Redis; with a RabbitMQ broker (amqp://) it is required.
    status_url: str | None = None
    # The master group of a sentinel:// broker URL (VARCO_BROKER_URL=sentinel://h1:26379/0;sentinel://h2:26379/0).
    sentinel_master: str = "mymaster"
    # Connect and command timeout for Redis: a broker that is down or hung fails a call in bounded time.
    redis_timeout_s: float = Field(default=5.0, gt=0, le=300)
    result_store: str = Field(default_factory=_default_result_store)
    s3_endpoint_url: str | None = None
    model: str = "NCSOFT/VARCO-VISION-14B-HF"
    # auto: bfloat16 on CUDA, float32 on CPU (CPU half precision is slow and lossy).
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # auto: vllm when it is importable and CUDA is available, else hf.
    engine: Literal["auto", "hf", "vllm"] = "auto"
    # "module:function" callables run on the engine before it loads (the dev tooling scripts the tiny model).
    engine_plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # hf backend: batch size, gathering window, and the padded-token cap of one generate call.
    max_batch_size: int = Field(default=8, ge=1, le=256)
    max_wait_ms: int = Field(default=20, ge=0, le=60_000)
    max_batch_tokens: int = Field(default=65_536, ge=1)
    # vllm backend: KV-cache share of GPU memory (of RAM on CPU), concurrent sequences, context length,
    # and any other vLLM EngineArgs as JSON (e.g. '{"enforce_eager": true}').
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_num_seqs: int = Field(default=64, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict)
    max_new_tokens: int = Field(default=1024, ge=1, le=8192)
    # Tag-constrained decoding (tasks/tag_grammar.py) for jobs that leave `constrained` unset: "on" for
    # grounding and OCR, "all" for every task, "off" for none. A job's own `constrained` wins.
    constrained_tags: Literal["on", "off", "all"] = "on"
    callback_secret: SecretStr | None = None
    allow_private_urls: bool = False
    file_root: Path | None = None
    # Buckets s3:// image URIs may name, comma-separated ("*": any); empty: s3:// images are refused.
    s3_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=64_000_000, ge=1)
    # Pixels of full-size decoded images a worker holds at once, every task thread together (one image at
    # the pixel limit, or several smaller ones); each is shrunk to the processor's size before the next.
    decode_budget_pixels: int = Field(default=64_000_000, ge=1)
    max_data_uri_bytes: int = Field(default=256 * 1024, ge=1)
    fetch_timeout_s: float = Field(default=15.0, gt=0)
    visibility_timeout: int = Field(default=3600, ge=10)
    max_attempts: int = Field(default=3, ge=1)
    # A computed result's write is retried in place (backoff, jitter) this long before the job fails.
    store_retry_s: float = Field(default=300.0, ge=0)
    # An s3:// image read is retried in place through transient errors this long before the job retries.
    s3_read_retry_s: float = Field(default=30.0, ge=0)
    status_ttl: int = Field(default=7 * 24 * 3600, ge=60)
    # Task type -> queue, e.g. VARCO_TASK_ROUTES='{"ocr": "varco.ocr"}'; unlisted types use "varco".
    task_routes: dict[str, str] = Field(default_factory=dict)
    callback_max_retries: int = Field(default=8, ge=0)
    # One webhook attempt, connect + headers + body, ends after this long (a trickling receiver is cut).
    callback_timeout_s: float = Field(default=10.0, gt=0)
    # Concurrent deliveries per receiver (scheme, host, port) in one callback worker; more are put back.
    callback_host_concurrency: int = Field(default=2, ge=1)
    # Worker logs: text, or one JSON object per line with job_id, task and worker fields.
    log_format: Literal["text", "json"] = "text"
    # Each `varco worker` node serves /metrics, /livez and /readyz here (port 0: not at all). All addresses
    # by default, so a pod's probes and scrapes reach it; 127.0.0.1 keeps it on the host.
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=9808, ge=0, le=65535)
    # /livez fails when an engine holds requests but has made no progress (a decode step) for this long.
    liveness_stall_s: float = Field(default=300.0, gt=0)
    # Workers keep each job's fetched image bytes beside its result (`{job_id}.image`) for overlays.
    keep_images: bool = True
    # Seconds a result may answer a repeat job (same image bytes, task, prompt, region, label,
    # max_new_tokens and model) without inference; 0: no result cache.
    result_cache_ttl: int = Field(default=0, ge=0)
    # Celery task events from the start (task-sent/received/started/succeeded: one Redis PUBLISH each, 4 per job,
    # a tenth of a job's Redis commands). Off by default: Flower turns them on by itself (its enable_events
    # broadcast, every 5 s, reaches `varco worker`, which keeps its event dispatcher up for it), and
    # `celery control enable_events` does the same for `celery events`. true sends them from the first job
    # (and the producer's task-sent too) (docs/redis.md#cost-per-job).
    task_events: bool = False
    # HTTP gateway (`varco gateway`): port, API keys (comma-separated, or one per line in a file), an
    # optional per-key rate limit in requests/s (a token bucket per gateway process), the request body
    # cap and read timeout, the most jobs one batch may hold, and the connections uvicorn serves at once.
    gateway_port: int = Field(default=8000, ge=1, le=65535)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    rate_limit: float | None = Field(default=None, gt=0)
    gateway_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    gateway_max_batch: int = Field(default=100, ge=1, le=10_000)
    gateway_max_connections: int = Field(default=1000, ge=1)
    # Seconds an idle keep-alive connection stays open. Above the 5 s after which httpx (and the OpenAI SDK)
    # stop reusing one, so a client never sends on a connection the gateway is closing (a reset); behind a
    # load balancer, set it above the balancer's idle timeout (75 for an AWS ALB's 60).
    gateway_keep_alive_s: int = Field(default=15, ge=1)
    gateway_body_timeout_s: float = Field(default=30.0, gt=0)  # a request body must be in within this (408)
    # Overlays the gateway draws at once (each holds its image decoded at full size, up to ~200 MB at the
    # pixel limit); more requests wait, holding no thread, and most then find the overlay in the store.
    gateway_overlay_renders: int = Field(default=1, ge=1)
    # Event streams (job events, streamed chat completions) one API key may hold open at once, per gateway
    # process: each holds a Redis connection; beyond it 429 `too-many-streams`.
    gateway_max_streams_per_key: int = Field(default=20, ge=1)
    # How long an open event stream rides out a Redis outage (a restart, a failover) before it ends with
    # `event: interrupted` (reason `broker-unavailable`); the client reconnects with Last-Event-ID.
    gateway_stream_outage_s: float = Field(default=60.0, ge=0)

    # Tenants (docs/tenants.md): GPU share weights as `teamA=3,teamB=1` (unlisted tenants weigh 1), queued-job
    # limits per tenant and in all (0: none), and the seconds a job may wait to start (None: forever).
    tenant_weights: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    max_queued_per_tenant: int = Field(default=0, ge=0)
    max_queued: int = Field(default=0, ge=0)
    default_deadline_s: float | None = Field(default=None, gt=0)
    # Batch API (docs/gateway.md#batch-api): the priority of batch lines (interactive jobs default to 4), an
    # input file's limits, and the batch runner's lease on a batch and its polling interval.
    batch_priority: int = Field(default=1, ge=0, le=9)
    batch_max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    batch_max_lines: int = Field(default=50_000, ge=1)
    batch_lease_s: float = Field(default=30.0, ge=1)
    batch_poll_s: float = Field(default=1.0, gt=0)

    @field_validator("tenant_weights", mode="before")
    @classmethod
    def _weights(cls, value: object) -> object:
        return parse_weights(value) if isinstance(value, str) else value

    @field_validator("engine_plugins", "s3_buckets", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("vllm_engine_args", "task_routes", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        return json.loads(value) if isinstance(value, str) else value  # settings_from_env passes raw strings

    @field_validator("result_store")
    @classmethod
    def _store_is_a_prefix(cls, value: str) -> str:
        if not value.startswith(("s3://", "file://")):
            raise ValueError("VARCO_RESULT_STORE must be s3://bucket/prefix/ or file:///abs/dir/")
        return value if value.endswith("/") else value + "/"

    @property
    def status_redis_url(self) -> str:
        """The Redis that holds status records, events, leases and the fair queue."""
        return self.status_url or self.broker_url

    @model_validator(mode="after")
    def _status_redis_is_named(self) -> Settings:
        if self.status_url is None and is_amqp(self.broker_url):
            raise ValueError("VARCO_BROKER_URL is RabbitMQ (amqp://): set VARCO_STATUS_URL to the Redis that keeps "
                             "status records, events and the fair queue (redis, rediss or sentinel)")  # fmt: skip
        if self.status_url is not None and is_amqp(self.status_url):
            raise ValueError("VARCO_STATUS_URL must name Redis (redis://, rediss:// or sentinel://), not RabbitMQ")
        return self

    @model_validator(mode="after")
    def _image_sources_exclude_the_store(self) -> Settings:
        """A job must never read the result store as its image: that would hand one key another job's kept
        image (`{job_id}.image`) and results. Refused at start rather than checked per fetch."""
        store = urlsplit(self.result_store)
        if store.scheme == "file" and self.file_root is not None:
            root, path = self.file_root.resolve(), Path(unquote(store.path)).resolve()
            if path.is_relative_to(root):
                raise ValueError(f"VARCO_FILE_ROOT ({root}) holds the result store ({path}): give it a directory "
                                 "of images only")  # fmt: skip
        if store.scheme == "s3" and ("*" in self.s3_buckets or store.netloc in self.s3_buckets):
            raise ValueError(f"VARCO_S3_BUCKETS ({','.join(self.s3_buckets)}) covers the result store's bucket "
                             f"{store.netloc!r}: list the image buckets only")  # fmt: skip
        return self


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Settings from a mapping shaped like the environment (the VARCO_* keys of a child's env)."""
    prefix = "VARCO_"
    return Settings(**{k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)})


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; tests build their own `Settings(...)` instead."""
    return Settings()
