"""VARCO_LOG_FORMAT=json: one JSON object per line with job fields; presigned URLs lose their query strings."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import CAT, running_worker

from varco.producer import Client
from varco.tasks.settings import settings_from_env
from varco.workers.devtools.local_redis import LocalRedis, free_port

CELERY_SHUTDOWN_NOTICE = "worker: Warm shutdown (MainProcess)"


def test_json_logs_carry_job_fields_and_no_url_secrets(
    worker_env: dict, redis_server: LocalRedis, http_files, receiver, tmp_path: Path
) -> None:
    signed = http_files.add("/signed.png?X-Amz-Credential=AKIA&X-Amz-Signature=topsecret", CAT)
    env = {
        **worker_env,
        "VARCO_BROKER_URL": redis_server.url.rsplit("/", 1)[0] + "/4",
        "VARCO_METRICS_PORT": str(free_port()),
        "VARCO_LOG_FORMAT": "json",
    }
    log_path = tmp_path / "worker.log"
    with running_worker(env, log_path):
        client = Client(settings_from_env(env))
        try:
            job_id = client.submit(signed, "caption")
            assert next(client.wait(job_id, timeout=120)).state.value == "succeeded"
            # A password in the image and callback URLs, a presigned query on a 404: the job fails, and
            # neither its error (status record, job.failed webhook) nor any log line keeps them.
            secret_base = http_files.base.replace("://", "://alice:S3cretPassw0rd@")
            image = f"{secret_base}/missing.png?X-Amz-Signature=abc"
            hook = receiver.url("/leak-hook").replace("://", "://bob:H00kPassw0rd@")
            receiver.status_for = lambda path: 410 if path == "/leak-hook" else 204  # logged with its URL
            failed_id = client.submit(image, "caption", callback_url=hook, callback_events=["job.failed"])
            failed = next(client.wait(failed_id, timeout=120))
            webhooks = receiver.wait_for(lambda got: any(r.path == "/leak-hook" for r in got))
        finally:
            receiver.status_for = lambda path: 204
            client.close()
    text = log_path.read_text()
    assert "topsecret" not in text and "AKIA" not in text
    assert failed.state.value == "failed" and failed.error is not None
    sent = json.loads(next(r.body for r in webhooks if r.path == "/leak-hook"))
    assert sent["type"] == "job.failed" and sent["error"] == failed.error.model_dump()
    assert failed.error.message.endswith("/missing.png?[redacted]"), failed.error
    for leaked in ("S3cretPassw0rd", "alice", "X-Amz-Signature=abc", "H00kPassw0rd"):
        assert leaked not in failed.error.message and leaked not in text, leaked
    assert "refused with HTTP 410" in text  # the callback process logged the delivery, URL redacted
    # Every line is a JSON record but Celery's own shutdown notice, which it prints past logging.
    lines = [line for line in text.splitlines() if line.strip() and line != CELERY_SHUTDOWN_NOTICE]
    records = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message", "worker"} <= set(r) for r in records)
    mine = [r for r in records if r.get("job_id") == job_id]
    assert mine and all(r["task"] == "caption" and r["worker"].startswith("cpu0@") for r in mine)
    fetches = [r for r in mine if r["logger"] == "httpx"]
    assert fetches and "/signed.png?[redacted]" in fetches[0]["message"]
