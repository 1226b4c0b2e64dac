"""The function RQ runs for every attempt of every job: start, run the handler, finish.

The process's `Runtime` is built once (by `orchestrator worker` at start, or lazily here) and
serves every job the process runs; per job there is one transaction to start it, the handler, and
one to finish it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rq.timeouts import JobTimeoutException

from orchestrator.core.tasktypes import TaskError
from orchestrator.errors import IllegalTransition, JobCancelled, NotFound
from orchestrator.settings import Settings
from orchestrator.store.tables import Job
from queues.context import WorkerContext
from queues.runtime import Runtime

log = logging.getLogger(__name__)

_RUNTIME: Runtime | None = None


def runtime(settings: Settings | None = None, worker_name: str | None = None) -> Runtime:
    """This process's runtime, built on first use and kept."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = Runtime(settings or Settings(), worker_name)
    return _RUNTIME


def run_job(job_id: str) -> None:
    execute(runtime(), job_id)


def execute(rt: Runtime, job_id: str) -> None:
    actor = f"worker:{rt.worker_name}"
    job = rt.run_sync(_begin(rt, job_id, actor))
    task = rt.registry.get(job.type) if job is not None else None
    if job is None or (task is not None and task.deferred_start and job.status != "queued"):
        log.info("job %s is not runnable (cancelled, finished or unknown); skipping", job_id)
        return

    def finish(coro: Any) -> None:
        try:
            rt.run_sync(coro)
        except (IllegalTransition, NotFound):
            pass  # finished elsewhere (cancelled, timed out): nothing more to say

    n = job.attempts
    if task is None:
        finish(rt.lifecycle.fail(job_id, "TASK_ERROR", f"unknown task type {job.type!r}", actor, attempt=n))
        return
    deadline = time.monotonic() + task.timeout_s
    ctx = WorkerContext(job_id, n, actor, _Guarded(rt), rt.artifacts, rt.run_sync, deadline=deadline)
    try:
        with rt.interruptible:
            inp = task.input_model.model_validate(job.input)
            ctx.state = rt.state(task)
            result = task.handler(ctx, inp)
    except JobCancelled:
        return
    except JobTimeoutException:
        finish(timed_out(rt, job_id, n, task.timeout_s))
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


def timed_out(rt: Runtime, job_id: str, attempt: int, timeout_s: float) -> Any:
    """The attempt ran past its type's timeout: the job ends `timed_out` (refunded)."""
    return rt.lifecycle.fail(
        job_id, "TIMEOUT", f"exceeded the {timeout_s:g} s timeout", "timeout", status="timed_out", attempt=attempt
    )


async def _begin(rt: Runtime, job_id: str, actor: str) -> Job | None:
    """Start the job (one transaction) and return it; None when it must not run. A type that
    starts later (at its provider) is only read, so it needs the read first."""
    if rt.registry.any_deferred_start():
        async with rt.db.read() as s:
            job = await s.get(Job, job_id)
        if job is None:
            return None
        task = rt.registry.get(job.type)
        if task is not None and task.deferred_start:
            return job
    return await rt.lifecycle.start(job_id, actor, rt.worker_name)


class _Guarded:
    """The lifecycle as a task sees it: reporting on a finished job raises JobCancelled."""

    def __init__(self, rt: Runtime) -> None:
        self._lc = rt.lifecycle

    async def progress(
        self,
        job_id: str,
        progress: float,
        message: str | None,
        data: dict[str, Any] | None,
        actor: str,
        attempt: int | None = None,
    ) -> None:
        try:
            await self._lc.progress(job_id, progress, message, data, actor, attempt)
        except IllegalTransition as exc:
            raise JobCancelled(str(exc)) from exc

    async def handoff(self, job_id: str, provider: str, request_id: str, actor: str) -> None:
        try:
            await self._lc.handoff(job_id, provider, request_id, actor)
        except IllegalTransition as exc:
            raise JobCancelled(str(exc)) from exc

    async def log(
        self, job_id: str, message: str, data: dict[str, Any] | None, actor: str, attempt: int | None = None
    ) -> None:
        try:
            await self._lc.log(job_id, message, data, actor, attempt)
        except IllegalTransition as exc:
            raise JobCancelled(str(exc)) from exc
