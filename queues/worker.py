"""`orchestrator worker`: one RQ worker process (fork per job, RQ's scheduler for delayed retries)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket

from redis import Redis
from rq import Queue, Worker

from orchestrator.db import Database
from orchestrator.settings import Settings
from queues.registry import QUEUES

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(2)}"


def run_worker(settings: Settings, queues: list[str], burst: bool = False) -> bool:
    for q in queues:
        if q not in QUEUES:
            raise SystemExit(f"unknown queue {q!r}; known: {', '.join(QUEUES)}")
    asyncio.run(_ensure_schema(settings))
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
    conn = Redis.from_url(settings.redis)
    worker = Worker([Queue(q, connection=conn) for q in queues], connection=conn, name=worker_name())
    log.info("worker %s on queues %s", worker.name, ",".join(queues))
    return bool(worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level))


async def _ensure_schema(settings: Settings) -> None:
    db = Database(settings.db_url)
    try:
        await db.create_schema()
    finally:
        await db.dispose()
