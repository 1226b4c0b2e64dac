# The orchestrator image: `orchestrator serve` by default; compose runs workers from the same image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The locked runtime dependencies first (hash-checked; a layer that changes only with the lock),
# then the project itself with --no-deps: nothing is resolved at build time.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY queues ./queues
COPY ws_gateway ./ws_gateway
COPY metrics ./metrics
RUN pip install --no-deps . \
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
