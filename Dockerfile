# The orchestrator image: `orchestrator serve` by default; compose runs workers from the same image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY queues ./queues
COPY ws_gateway ./ws_gateway
COPY metrics ./metrics
RUN pip install . \
    && rm -rf /app/build

# Non-root; /data holds artifacts (and the SQLite file when DATABASE_URL is unset).
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin orchestrator \
    && mkdir -p /data \
    && chown orchestrator:orchestrator /data
USER orchestrator
WORKDIR /home/orchestrator

ENV ORCH_HOST=0.0.0.0 \
    ORCH_PORT=8080 \
    ORCH_DATA_DIR=/data

VOLUME ["/data"]
EXPOSE 8080 9100

CMD ["orchestrator", "serve"]
