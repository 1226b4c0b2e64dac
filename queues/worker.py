"""`orchestrator worker`: one RQ worker process (a forked work horse per job).

Besides RQ's own bookkeeping, the worker keeps `orch:hb:{name}` alive (TTL = ORCH_WORKER_LOST_AFTER)
while it lives; the sweeper treats a running job whose worker key expired as lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from typing import Any

from redis import Redis
from rq import Queue, Worker

from orchestrator import keys
from orchestrator.db import Database
from orchestrator.settings import Settings
from queues.registry import QUEUES

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(2)}"


class OrchestratorWorker(Worker):
    """An RQ worker whose heartbeat key names the attempt it runs ("idle" between jobs), so the
    sweeper can tell a live worker from a dead one and a running attempt from a vanished one."""

    lost_after_s: float = 60.0
    running_rq_id: str = ""

    def orch_heartbeat(self) -> None:
        try:
            self.connection.set(
                keys.worker_heartbeat(self.name), self.running_rq_id or "idle", ex=max(1, int(self.lost_after_s))
            )
        except Exception as exc:  # Redis away: RQ will notice too
            log.warning("heartbeat failed: %s", exc)

    def heartbeat(self, timeout: Any = None, pipeline: Any = None) -> None:
        super().heartbeat(timeout, pipeline)
        self.orch_heartbeat()

    def execute_job(self, job: Any, queue: Any) -> None:
        self.running_rq_id = job.id
        self.orch_heartbeat()
        try:
            super().execute_job(job, queue)
        finally:
            self.running_rq_id = ""
            self.orch_heartbeat()


def run_worker(settings: Settings, queues: list[str], burst: bool = False) -> bool:
    for q in queues:
        if q not in QUEUES:
            raise SystemExit(f"unknown queue {q!r}; known: {', '.join(QUEUES)}")
    asyncio.run(_ensure_schema(settings))
    _preload(settings)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
    conn = Redis.from_url(settings.redis)
    lost_after = settings.worker_lost_after_s
    worker = OrchestratorWorker(
        [Queue(q, connection=conn) for q in queues],
        connection=conn,
        name=worker_name(),
        # heartbeat often enough that a live worker is never taken for lost
        job_monitoring_interval=max(1, int(lost_after / 4)),
    )
    worker.lost_after_s = lost_after
    log.info("worker %s on queues %s", worker.name, ",".join(queues))
    return bool(worker.work(burst=burst, with_scheduler=False, logging_level=settings.log_level))


def _preload(settings: Settings) -> None:
    """Import what every job needs (the runner, the core, numpy, Pillow, the task modules) once in
    the worker, so each forked work horse starts with them loaded instead of importing them."""
    import queues.runner  # noqa: F401
    from queues.registry import build_registry
    from queues.runtime import warm_database

    build_registry(settings)
    warm_database(settings)


async def _ensure_schema(settings: Settings) -> None:
    db = Database(settings.db_url)
    try:
        await db.create_schema()
    finally:
        await db.dispose()
