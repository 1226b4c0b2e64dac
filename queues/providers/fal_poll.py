"""The polling side of fal jobs: a background loop in every API process.

Jobs to poll sit in the sorted set `fal_tasks.DUE` (job id → due time). Each loop claims due
jobs atomically by pushing their time a lease ahead (`LEASE_S`), polls them concurrently, and
sets the next time (or removes the job once it is final). A process that dies mid-poll loses
nothing: the lease runs out and another process polls the job. No worker is held, and fal's
minutes of queueing and inference cost one status call per poll.

One poll asks fal for the request's status (with logs) and reports what changed: IN_QUEUE → a
`progress` event "queue position N" (when N changes); IN_PROGRESS → the job starts (`running`)
and new fal log lines become `log` events; COMPLETED → `fal_tasks.settle`, the webhook's path.
A failed status call (5xx, 429, network) is retried with backoff; ORCH_FAL_POLL_MAX_ERRORS in a
row fail the job (PROVIDER_ERROR). Every job's polling is bounded: it stops when the job is
final, and a job older than its type's timeout fails with TIMEOUT. A job found cancelled (or
timed out) gets its fal request cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from orchestrator.errors import IllegalTransition
from orchestrator.models import Job
from orchestrator.views import FINAL
from queues.providers import fal_tasks as ft
from queues.providers.fal_api import AsyncFalAPI, FalError, FalStatus

if TYPE_CHECKING:
    from orchestrator.core import Core

log = logging.getLogger(__name__)

TICK_S = 0.25
LEASE_S = 120.0
"""A claimed poll must finish within this (a status call, and downloads on completion)."""
CONCURRENCY = 16
"""Polls one process runs at once."""
CRASH_RETRY_S = 5.0
MAX_LOG_EVENTS = 1000
"""fal log lines turned into events per job; later ones are dropped (fal keeps them all)."""
MAX_LOGS_PER_POLL = 200

_CLAIM = """
local due = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do redis.call('zadd', KEYS[1], ARGV[2], member) end
return due
"""


def background_tasks(core: Core) -> list[asyncio.Task[None]]:
    """For `orchestrator.background.start_background`: the poll loop, when fal is configured."""
    if not core.settings.fal_key:
        return []
    return [asyncio.create_task(run(core), name="fal-poller")]


async def run(core: Core) -> None:
    poller = Poller(core)
    running: set[asyncio.Task[None]] = set()
    try:
        while True:
            free = CONCURRENCY - len(running)
            try:
                due = await claim(core.aredis, free) if free > 0 else []
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("claiming fal polls failed: %s", exc)
                due = []
                await asyncio.sleep(2)
            for job_id in due:
                task = asyncio.create_task(poller.poll(job_id))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.sleep(TICK_S)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await poller.aclose()


async def claim(aredis: aioredis.Redis, limit: int) -> list[str]:
    now = time.time()
    raw = await aredis.eval(_CLAIM, 1, ft.DUE, now, now + LEASE_S, limit)
    return [m.decode() if isinstance(m, bytes) else str(m) for m in raw or []]


class _State:
    def __init__(self, raw: dict[Any, Any]) -> None:
        def get(k: str, default: str = "") -> str:
            v = raw.get(k.encode(), raw.get(k))
            return v.decode() if isinstance(v, bytes) else default if v is None else str(v)

        self.request_id = get("request_id")
        self.model = get("model")
        self.n = int(get("n", "0"))
        self.errors = int(get("errors", "0"))
        self.logs = int(get("logs", "0"))
        self.position = get("position")


class Poller:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.lc = core.lifecycle
        self.r = core.aredis
        self.fs = ft.fal_settings()
        self.api = AsyncFalAPI(key=core.settings.fal_key or None)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.api.aclose()

    async def poll(self, job_id: str) -> None:
        try:
            await self._poll(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("polling fal for job %s failed; trying again in %s s", job_id, CRASH_RETRY_S)
            with contextlib.suppress(Exception):
                await self._next(job_id, CRASH_RETRY_S)

    async def _poll(self, job_id: str) -> None:
        raw = await self.r.hgetall(ft.state_key(job_id))
        state = _State(raw)
        job = await self._job(job_id)
        if job is None or not state.request_id:
            await self._forget(job_id)
            return
        if job.status in FINAL:
            await self._after_final(job, state)
            return
        task = self.core.registry.get(job.type)
        timeout_s = task.timeout_s if task is not None else 3600
        if time.time() - job.created_at > timeout_s:
            await self._time_out(job, state, timeout_s)
            return
        await self.r.hincrby(ft.state_key(job_id), "n", 1)
        try:
            st = await self.api.status(state.model, state.request_id)
        except FalError as exc:
            await self._call_failed(job, state, exc)
            return
        if state.errors:
            await self.r.hset(ft.state_key(job_id), "errors", 0)
        try:
            await self._report(job, state, st)
            if st.done:
                await self._finish(job, state)
                return
        except IllegalTransition:  # cancelled or finished under us
            job = await self._job(job_id)
            if job is None or job.status in FINAL:
                if job is not None:
                    await self._after_final(job, state)
                return
        await self._next(job_id, self.fs.poll_delay_s(state.n + 2))  # this was poll n + 1

    # --- steps --------------------------------------------------------------------------------

    async def _report(self, job: Job, state: _State, st: FalStatus) -> None:
        key = ft.state_key(job.id)
        if st.state == "IN_QUEUE":
            pos = "" if st.queue_position is None else str(st.queue_position)
            if pos != state.position:
                message = f"queue position {pos}" if pos else "in queue"
                data = {"source": "fal", "queuePosition": st.queue_position}
                await self.lc.progress(job.id, 0.0, message, data, ft.ACTOR)
                await self.r.hset(key, "position", pos)
            return
        if job.status == "queued" and await self.lc.start(job.id, ft.ACTOR, ft.PROVIDER) is None:
            raise IllegalTransition("job is not runnable")
        new = st.logs[state.logs : min(len(st.logs), MAX_LOG_EVENTS)][:MAX_LOGS_PER_POLL]
        for i, line in enumerate(new, start=state.logs):
            await self.lc.log(job.id, line[:1000], {"source": "fal", "index": i}, ft.ACTOR)
            await self.r.hincrby(key, "logs", 1)

    async def _finish(self, job: Job, state: _State) -> None:
        outcome: dict[str, Any] | FalError
        try:
            outcome = await self.api.result(state.model, state.request_id)
        except FalError as exc:
            if exc.retryable:
                await self._call_failed(job, state, exc)
                return
            outcome = exc  # the model failed (or the request was cancelled at fal)
        finisher = ft.Finisher(self.lc, self.core.artifacts, self.r, self.fs)
        done = await ft.settle(finisher, job.id, state.request_id, state.model, outcome, "poll")
        if done.outcome == "busy":
            await self._next(job.id, 1.0)
        else:
            await self._forget(job.id)

    async def _call_failed(self, job: Job, state: _State, exc: FalError) -> None:
        if not exc.retryable:
            await self._fail(job.id, f"fal: {exc.message}")
            return
        errors = int(await self.r.hincrby(ft.state_key(job.id), "errors", 1))
        log.warning("fal status for job %s failed (%d in a row): %s", job.id, errors, exc.message)
        if errors >= self.fs.poll_max_errors:
            await self._cancel_at_fal(state)
            await self._fail(job.id, f"fal kept failing ({errors} times): {exc.message}")
            return
        await self._next(job.id, self.fs.poll_delay_s(errors + 1))

    async def _time_out(self, job: Job, state: _State, timeout_s: int) -> None:
        await self._cancel_at_fal(state)
        message = f"exceeded the {timeout_s} s timeout"
        status = "timed_out" if job.status == "running" else "failed"
        with contextlib.suppress(IllegalTransition):
            await self.lc.fail(job.id, "TIMEOUT", message, "timeout", status=status)
        await self._forget(job.id)

    async def _after_final(self, job: Job, state: _State) -> None:
        if job.status in ("cancelled", "timed_out"):
            await self._cancel_at_fal(state)
        await self._forget(job.id)

    # --- helpers ------------------------------------------------------------------------------

    async def _cancel_at_fal(self, state: _State) -> None:
        try:
            await self.api.cancel(state.model, state.request_id)
        except FalError as exc:  # 400 ALREADY_COMPLETED, 404: nothing left to stop
            log.info("fal cancel of %s: %s", state.request_id, exc.message)

    async def _fail(self, job_id: str, message: str) -> None:
        with contextlib.suppress(IllegalTransition):
            await self.lc.fail(job_id, "PROVIDER_ERROR", message[:1000], ft.ACTOR)
        await self._forget(job_id)

    async def _next(self, job_id: str, delay_s: float) -> None:
        await self.r.zadd(ft.DUE, {job_id: time.time() + delay_s})

    async def _forget(self, job_id: str) -> None:
        await self.r.zrem(ft.DUE, job_id)
        await self.r.delete(ft.state_key(job_id))

    async def _job(self, job_id: str) -> Job | None:
        async with self.lc.db.read() as s:
            return await s.get(Job, job_id)
