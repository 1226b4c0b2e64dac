"""The polling side of fal jobs: a background loop in every API process.

Jobs to poll sit in the sorted set `fal_tasks.DUE` (job id → due time). Each loop claims due
jobs atomically by pushing their time a lease ahead (`LEASE_S`), polls them concurrently, and
sets the next time (or removes the job once it is final). A process that dies mid-poll loses
nothing: the lease runs out and another process polls the job. No worker is held, and fal's
minutes of queueing and inference cost one status call per poll.

One poll asks fal for the request's status (with logs) and reports what changed: IN_QUEUE → a
`progress` event "queue position N" (when N changes); IN_PROGRESS → the job starts (`running`)
and new fal log lines become `log` events; COMPLETED → `fal_tasks.settle`, the webhook's path.
fal log lines keep fal's level and timestamp in the event's `data`. A COMPLETED status that
carries an error fails the job at once (PROVIDER_ERROR, fal's message), whatever HTTP code the
result would answer. A failed status call (5xx, 429, network) is retried with backoff, and
ORCH_FAL_POLL_MAX_ERRORS in a row fail the job (PROVIDER_ERROR); so do as many failed result
calls after COMPLETED, counted on their own. A job whose poll state Redis lost is rebuilt from
SQL (`fal_tasks.watch`, also run by the sweeper, which owns fal jobs' timeouts). A timed-out
job's fal request is cancelled; a cancelled job's request is followed until fal says how it
ended (see `_follow_cancelled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from orchestrator import dueset
from orchestrator.errors import IllegalTransition
from orchestrator.fal import tasks as ft
from orchestrator.fal.api import AsyncFalAPI, FalError, FalStatus
from orchestrator.loops import every
from orchestrator.states import FINAL
from orchestrator.store.tables import Job

if TYPE_CHECKING:
    from orchestrator.core.services import Core

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


def background_tasks(core: Core) -> list[asyncio.Task[None]]:
    """For `orchestrator.background.start.start_background`: the poll loop, when fal is configured."""
    if not core.settings.fal_key:
        return []
    return [asyncio.create_task(run(core), name="fal-poller")]


async def run(core: Core) -> None:
    poller = Poller(core)
    running: set[asyncio.Task[None]] = set()
    try:

        async def step() -> None:
            free = CONCURRENCY - len(running)
            for job_id in await claim(core.aredis, free) if free > 0 else []:
                task = asyncio.create_task(poller.poll(job_id))
                running.add(task)
                task.add_done_callback(running.discard)

        await every("claiming fal polls", TICK_S, step)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await poller.aclose()


async def claim(aredis: aioredis.Redis, limit: int) -> list[str]:
    return await dueset.aclaim(aredis, ft.DUE, limit, LEASE_S)


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
        self.cancel_sent = get("cancel_sent") == "1"


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
        job = await self._job(job_id)
        if job is None:
            await self._forget(job_id)
            return
        state = _State(await self.r.hgetall(ft.state_key(job_id)))
        if not state.request_id and await ft.watch(self.r, job):  # Redis lost it: SQL has it
            state = _State(await self.r.hgetall(ft.state_key(job_id)))
        if not state.request_id:
            await self._forget(job_id)
            return
        if job.status in FINAL:
            await self._after_final(job, state)
            return
        # No timeout here: the sweeper times fal jobs out as it does every job.
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
                await self._finish(job, state, st)
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
        entries = st.log_entries
        new = entries[state.logs : min(len(entries), MAX_LOG_EVENTS)][:MAX_LOGS_PER_POLL]
        for i, entry in enumerate(new, start=state.logs):
            data = {"source": "fal", "index": i, "level": entry.level, "timestamp": entry.timestamp}
            await self.lc.log(job.id, entry.message[:1000], data, ft.ACTOR)
            await self.r.hincrby(key, "logs", 1)

    async def _finish(self, job: Job, state: _State, st: FalStatus) -> None:
        outcome: dict[str, Any] | FalError
        if st.failed:  # the status says how it ended: no need for the result's HTTP code
            outcome = FalError(st.error or "fal request failed", error_type=st.error_type)
        else:
            try:
                outcome = await self.api.result(state.model, state.request_id)
            except FalError as exc:
                if not exc.retryable:
                    outcome = exc  # the model failed (or the request was cancelled at fal)
                else:
                    await self._result_failed(job, state, exc)
                    return
        finisher = ft.Finisher(self.lc, self.core.artifacts, self.r, self.fs)
        done = await ft.settle(finisher, job.id, state.request_id, state.model, outcome, "poll")
        if done.outcome == "busy":
            await self._next(job.id, 1.0)
        else:
            await self._forget(job.id)

    async def _result_failed(self, job: Job, state: _State, exc: FalError) -> None:
        """fal said COMPLETED but its result answers 5xx/429/network: retried on the schedule,
        counted apart from status errors (a good status does not reset it)."""
        errors = int(await self.r.hincrby(ft.state_key(job.id), "result_errors", 1))
        log.warning("fal result for job %s failed (%d times): %s", job.id, errors, exc.message)
        if errors >= self.fs.poll_max_errors:
            await self._fail(job.id, f"fal: fetching the result failed {errors} times: {exc.message}")
            return
        await self._next(job.id, self.fs.poll_delay_s(errors + 1))

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

    async def _after_final(self, job: Job, state: _State) -> None:
        if job.status == "cancelled" and job.refunded > 0:
            await self._follow_cancelled(job, state)
            return
        if job.status == "timed_out":
            await self._cancel_at_fal(state)
        await self._forget(job.id)

    async def _follow_cancelled(self, job: Job, state: _State) -> None:
        """A cancelled job's fal request is followed until fal says how it ended: cancelled
        (or failed), and the refund stands; completed after all, and fal billed it, so the job
        keeps its charge (`settle`). Bounded by the type's timeout after the cancel."""
        if not state.cancel_sent:
            await self.r.hset(ft.state_key(job.id), "cancel_sent", 1)
            await self._cancel_at_fal(state)
        task = self.core.registry.get(job.type)
        timeout_s = task.timeout_s if task is not None else 3600
        if time.time() - (job.finished_at or job.updated_at) > timeout_s:
            log.info("fal request %s of cancelled job %s never ended; the refund stands", state.request_id, job.id)
            await self._forget(job.id)
            return
        try:
            st = await self.api.status(state.model, state.request_id)
        except FalError as exc:
            if exc.retryable:
                await self._next(job.id, self.fs.poll_delay_s(state.n + 2))
            else:  # fal no longer knows it: nothing ran to bill
                await self._forget(job.id)
            return
        if not st.done:
            await self.r.hincrby(ft.state_key(job.id), "n", 1)
            await self._next(job.id, self.fs.poll_delay_s(state.n + 2))
            return
        if not st.failed:
            finisher = ft.Finisher(self.lc, self.core.artifacts, self.r, self.fs)
            done = await ft.settle(finisher, job.id, state.request_id, state.model, {}, "poll")
            if done.outcome == "busy":
                await self._next(job.id, 1.0)
                return
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
