"""The function RQ runs for every attempt of every job: start, run the handler, finish."""

from __future__ import annotations

import logging
import os

from rq.timeouts import JobTimeoutException

from orchestrator.errors import IllegalTransition, JobCancelled, NotFound
from orchestrator.models import Job
from orchestrator.settings import Settings
from queues.context import TaskContext
from queues.registry import TaskError
from queues.runtime import Runtime

log = logging.getLogger(__name__)


def run_job(job_id: str) -> None:
    rt = Runtime(Settings())
    try:
        execute(rt, job_id)
    finally:
        rt.close()


def execute(rt: Runtime, job_id: str) -> None:
    worker = os.environ.get("RQ_WORKER_ID", f"pid{os.getpid()}")
    actor = f"worker:{worker}"
    job = rt.run_sync(_load(rt, job_id))
    task = rt.registry.get(job.type) if job is not None else None
    if job is not None and not (task is not None and task.deferred_start):
        job = rt.run_sync(rt.lifecycle.start(job_id, actor, worker))
    if job is None or (task is not None and task.deferred_start and job.status != "queued"):
        log.info("job %s is not runnable (cancelled, finished or unknown); skipping", job_id)
        return

    def finish(coro_factory: object) -> None:
        try:
            rt.run_sync(coro_factory)  # type: ignore[arg-type]
        except (IllegalTransition, NotFound):
            pass  # finished elsewhere (cancelled, timed out): nothing more to say

    n = job.attempts
    if task is None:
        finish(rt.lifecycle.fail(job_id, "TASK_ERROR", f"unknown task type {job.type!r}", actor, attempt=n))
        return
    ctx = TaskContext(job_id, n, actor, _Guarded(rt), rt.artifacts, rt.run_sync)
    try:
        inp = task.input_model.model_validate(job.input)
        result = task.handler(ctx, inp)
    except JobCancelled:
        return
    except JobTimeoutException:
        finish(
            rt.lifecycle.fail(
                job_id,
                "TIMEOUT",
                f"exceeded the {task.timeout_s} s timeout",
                "timeout",
                status="timed_out",
                attempt=n,
            )
        )
        return
    except TaskError as exc:
        if exc.retryable and n < task.max_attempts and not task.deferred_start:
            finish(rt.lifecycle.retry(job_id, str(exc), actor, task.backoff_s(n), attempt=n))
        else:
            finish(rt.lifecycle.fail(job_id, exc.code, str(exc), actor, attempt=n))
        return
    except Exception as exc:
        log.exception("job %s failed", job_id)
        finish(rt.lifecycle.fail(job_id, "TASK_ERROR", f"{type(exc).__name__}: {exc}", actor, attempt=n))
        return
    if not task.deferred_start:
        finish(rt.lifecycle.complete(job_id, result, actor, attempt=n))


async def _load(rt: Runtime, job_id: str) -> Job | None:
    async with rt.db.read() as s:
        return await s.get(Job, job_id)


class _Guarded:
    """The lifecycle as a task sees it: reporting on a finished job raises JobCancelled."""

    def __init__(self, rt: Runtime) -> None:
        self._lc = rt.lifecycle

    async def progress(self, *args: object, **kwargs: object) -> None:
        try:
            await self._lc.progress(*args, **kwargs)  # type: ignore[arg-type]
        except IllegalTransition as exc:
            raise JobCancelled(str(exc)) from exc

    async def handoff(self, *args: object, **kwargs: object) -> None:
        try:
            await self._lc.handoff(*args, **kwargs)  # type: ignore[arg-type]
        except IllegalTransition as exc:
            raise JobCancelled(str(exc)) from exc

    async def log(self, *args: object, **kwargs: object) -> None:
        try:
            await self._lc.log(*args, **kwargs)  # type: ignore[arg-type]
        except IllegalTransition as exc:
            raise JobCancelled(str(exc)) from exc
