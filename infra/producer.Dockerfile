# A base for Python producers (a web backend calling Client.submit): the client without torch, with
# tracing. Build from the repository root: docker build -f infra/producer.Dockerfile -t varco-producer .
# and FROM it in your application's image. Without an OTLP endpoint (and without a tracer provider of your
# application's own) nothing is traced; with one, each submit joins your request's trace (docs/tracing.md).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tasks tasks
COPY producer producer
COPY workers workers
COPY gateway gateway
RUN python -m venv /venv && /venv/bin/pip install --no-cache-dir '.[otel]'
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
CMD ["varco", "--help"]
