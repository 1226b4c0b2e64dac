"""One warm worker process: an RQ `SimpleWorker` that runs many jobs in-process, no fork per job.

Started by `orchestrator worker` (queues.supervisor), which restarts it when it dies, is ended
by the watchdog, or is recycled after `--max-jobs`. At start it builds the runtime once (event
loop, engines, Redis pools); each task type's `setup()` runs on its first job here. It tells the
supervisor what it runs through a pipe, one line each: `ready`, `run JOB ATTEMPT TIMEOUT`, `idle`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from redis import Redis
from rq import Queue, SimpleWorker, Worker

from orchestrator import keys
from orchestrator.core.tasktypes import QUEUES
from orchestrator.errors import IllegalTransition, NotFound
from orchestrator.settings import Settings
from orchestrator.store.db import Database
from queues import runner
from queues.runtime import Runtime
from queues.watch import JobWatch

log = logging.getLogger(__name__)

RECYCLE_EXIT = 75
"""Exit code of a worker that ran its `--max-jobs` and wants a fresh process."""


class OrchestratorWorker(SimpleWorker):
    """A SimpleWorker that keeps its heartbeat key and the supervisor told of the attempt it runs.

    RQ's `stop-job` command is a no-op here (there is no horse to kill): stops go through the stop
    flag instead (queues.watch)."""

    watch: JobWatch
    status_fd: int | None = None
    jobs_done = 0

    def execute_job(self, job: Any, queue: Any) -> None:
        job_id = str(job.args[0]) if job.args else job.id
        attempt = job.id.rsplit("_a", 1)[-1]
        self.watch.running(job.id, job_id)
        tell(self.status_fd, f"run {job_id} {attempt} {job.timeout or 0}")
        try:
            super().execute_job(job, queue)
        finally:
            self.watch.running("", "")
            tell(self.status_fd, "idle")
            self.jobs_done += 1


def tell(fd: int | None, line: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (line + "\n").encode())
    except OSError:
        pass  # the supervisor is gone; the watch thread notices and exits


def serve(
    settings: Settings,
    queues: list[str],
    name: str,
    burst: bool = False,
    max_jobs: int | None = None,
    status_fd: int | None = None,
    reports: list[dict[str, Any]] | None = None,
) -> int:
    """Run the worker until stopped; the exit code for the supervisor."""
    asyncio.run(_ensure_schema(settings))
    rt = runner.runtime(settings, name)
    rt.warm()
    conn = Redis.from_url(settings.redis)
    for report in reports or []:
        _report(rt, conn, report)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
    worker = OrchestratorWorker([Queue(q, connection=conn) for q in queues], connection=conn, name=name)
    worker.watch = JobWatch(conn, name, settings.worker_lost_after_s)
    worker.status_fd = status_fd
    rt.interruptible = worker.watch
    worker.watch.start()
    tell(status_fd, "ready")
    log.info("worker %s on queues %s", name, ",".join(queues))
    try:
        worked = worker.work(burst=burst, max_jobs=max_jobs, with_scheduler=False, logging_level=settings.log_level)
    finally:
        worker.watch.stop()
        conn.delete(keys.worker_heartbeat(name))
        rt.close()
    if max_jobs and worker.jobs_done >= max_jobs:
        return RECYCLE_EXIT
    return 0 if worked else 1


def _report(rt: Runtime, conn: Redis, report: dict[str, Any]) -> None:
    """Record what the supervisor saw happen to the previous process: an attempt the watchdog
    ended at its timeout, or one whose process died (a stale or finished attempt is left alone);
    then clear that process's heartbeat and RQ registration."""
    try:
        if report["kind"] == "timeout":
            rt.run_sync(runner.timed_out(rt, report["jobId"], int(report["attempt"]), float(report["timeoutS"])))
        elif report["kind"] == "lost":
            reason, actor = str(report["reason"]), f"worker:{report['worker']}"
            rt.run_sync(rt.lifecycle.lose(report["jobId"], int(report["attempt"]), reason, actor))
    except (IllegalTransition, NotFound):
        pass
    conn.delete(keys.worker_heartbeat(str(report["worker"])))
    dead = Worker.find_by_key(Worker.redis_worker_namespace_prefix + str(report["worker"]), connection=conn)
    if dead is not None:
        dead.register_death()


async def _ensure_schema(settings: Settings) -> None:
    db = Database(settings.db_url)
    try:
        await db.create_schema()
    finally:
        await db.dispose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="queues.worker", description="one warm worker process (see queues.supervisor)")
    p.add_argument("--queues", default=",".join(QUEUES))
    p.add_argument("--name", required=True)
    p.add_argument("--burst", action="store_true")
    p.add_argument("--max-jobs", type=int, default=0)
    p.add_argument("--status-fd", type=int)
    p.add_argument("--reports", default="[]", help="JSON list of attempts the last process left")
    args = p.parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(
        settings,
        [q for q in args.queues.split(",") if q],
        args.name,
        args.burst,
        args.max_jobs or None,
        args.status_fd,
        json.loads(args.reports),
    )


if __name__ == "__main__":
    sys.exit(main())
