# HTTP gateway image (no torch). Build from the repository root: docker build -f infra/gateway.Dockerfile .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tasks tasks
COPY producer producer
COPY workers workers
COPY gateway gateway
# otel: the gateway's request spans and the submit's, when OTEL_EXPORTER_OTLP_ENDPOINT is set (docs/tracing.md).
RUN python -m venv /venv && /venv/bin/pip install --no-cache-dir '.[gateway,otel]'
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8000
CMD ["varco", "gateway", "--port", "8000"]
