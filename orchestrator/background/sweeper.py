"""The sweeper: nothing stays lost, stuck or forgotten. One API process at a time runs it (a Redis
lock), every `ORCH_SWEEP_INTERVAL` seconds:

- a `running` job whose worker stopped heartbeating (ORCH_WORKER_LOST_AFTER), or whose RQ attempt
  is no longer running, is lost: retried if its type allows, else failed with WORKER_LOST;
- a `running` job past its timeout (plus grace) is timed out and its attempt stopped;
- a `queued` job that RQ does not hold (a crash between the SQL commit and the enqueue, a
  failed re-enqueue) is enqueued again;
- a job handed off to a provider (`provider_request_id` set, queued or running there) is timed
  out like any other (from its creation, as the provider's queue counts), its provider request
  cancelled by the type's cancel hook; while it lives, the type's `watch` hook puts it back on
  the provider's poll schedule if Redis lost it;
- finished jobs older than ORCH_RETENTION_DAYS lose their event history, deliveries and
  artifacts; the job row and the ledger stay; uploads older than that expire.

Every change goes through the lifecycle, so a race with a worker finishing the job is refused
there (IllegalTransition) and the sweeper moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select
from sqlmodel import col

from orchestrator import keys
from orchestrator.core import uploads
from orchestrator.core.services import Core
from orchestrator.errors import IllegalTransition, NotFound
from orchestrator.loops import every
from orchestrator.states import FINAL
from orchestrator.store.tables import Job, JobEvent, WebhookDelivery
from queues.dispatch import rq_job_id

log = logging.getLogger(__name__)

TIMEOUT_GRACE_S = 30.0
BATCH = 200


@dataclass
class SweepReport:
    lost: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    rewatched: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)


class Sweeper:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.token = secrets.token_hex(8)

    async def run(self) -> None:
        interval = self.core.settings.sweep_interval_s

        async def step() -> None:
            if await self._lock(interval):
                await self.sweep_once()

        await every("sweep", interval, step, max_backoff_s=interval)

    async def _lock(self, interval: float) -> bool:
        ttl_ms = int(max(interval * 2, 5) * 1000)
        got = await self.core.aredis.set(keys.SWEEPER_LOCK, self.token, nx=True, px=ttl_ms)
        if got:
            return True
        holder = await self.core.aredis.get(keys.SWEEPER_LOCK)
        if holder is not None and (holder.decode() if isinstance(holder, bytes) else holder) == self.token:
            await self.core.aredis.pexpire(keys.SWEEPER_LOCK, ttl_ms)
            return True
        return False

    async def sweep_once(self) -> SweepReport:
        report = SweepReport()
        await self._running(report)
        await self._queued(report)
        await self._handed_off(report)
        await self._retention(report)
        return report

    async def _oldest(self, order: Any, *where: Any) -> Sequence[Job]:
        """At most BATCH jobs matching `where`, oldest by `order` first (one pass's share)."""
        async with self.core.db.read() as s:
            return (await s.execute(select(Job).where(*where).order_by(order).limit(BATCH))).scalars().all()

    # ---- jobs a provider runs --------------------------------------------------------------

    async def _handed_off(self, report: SweepReport) -> None:
        now = time.time()
        rows = await self._oldest(
            col(Job.created_at),
            col(Job.status).in_(("queued", "running")),
            col(Job.provider_request_id).is_not(None),
        )
        for job in rows:
            task = self.core.registry.get(job.type)
            timeout = task.timeout_s if task else 3600
            if now - job.created_at > timeout:  # no worker to give grace to
                status = "timed_out" if job.status == "running" else "failed"
                with contextlib.suppress(IllegalTransition, NotFound):
                    applied = await self.core.lifecycle.fail(
                        job.id, "TIMEOUT", f"exceeded the {timeout} s timeout", "timeout", status=status
                    )
                    report.timed_out.append(job.id)
                    await self.core.lifecycle.cancel_at_provider(applied.job)
                continue
            watch = task.extra.get("watch") if task is not None else None
            if watch is not None and await watch(self.core.aredis, job):
                report.rewatched.append(job.id)

    # ---- running jobs ----------------------------------------------------------------------

    async def _running(self, report: SweepReport) -> None:
        now = time.time()
        rows = await self._oldest(
            col(Job.started_at), col(Job.status) == "running", col(Job.provider_request_id).is_(None)
        )
        for job in rows:
            task = self.core.registry.get(job.type)
            timeout = task.timeout_s if task else 3600
            if job.started_at and now - job.started_at > timeout + TIMEOUT_GRACE_S:
                with contextlib.suppress(IllegalTransition, NotFound):
                    await self.core.lifecycle.fail(
                        job.id,
                        "TIMEOUT",
                        f"exceeded the {timeout} s timeout",
                        "timeout",
                        status="timed_out",
                        attempt=job.attempts,
                    )
                    report.timed_out.append(job.id)
                    await self.core.dispatcher.astop(job.id, job.attempts)
                continue
            reason = await asyncio.to_thread(self._lost_reason, job)
            if reason:
                with contextlib.suppress(IllegalTransition, NotFound):
                    await self.core.lifecycle.lose(job.id, job.attempts, reason)
                    report.lost.append(job.id)

    def _lost_reason(self, job: Job) -> str | None:
        """Why the job's attempt is no longer running, or None if it still is (sync: Redis/RQ)."""
        redis = self.core.redis
        if job.worker_name and not redis.exists(keys.worker_heartbeat(job.worker_name)):
            return f"worker {job.worker_name} stopped heartbeating"
        rq_id = rq_job_id(job.id, job.attempts)
        if self.core.dispatcher.worker_running(job.worker_name, rq_id):
            return None
        # the worker lives but runs something else (its warm process was restarted, or the attempt ended
        # without a result): give the runner's last write a moment, then call the attempt lost
        if job.updated_at > time.time() - self.core.settings.requeue_after_s:
            return None
        status, _ = self.core.dispatcher.attempt_state(job.id, job.attempts)
        return f"attempt {job.attempts} is no longer running (RQ: {status or 'gone'})"

    # ---- queued jobs -----------------------------------------------------------------------

    async def _queued(self, report: SweepReport) -> None:
        cutoff = time.time() - self.core.settings.requeue_after_s
        rows = await self._oldest(
            col(Job.updated_at),
            col(Job.status) == "queued",
            col(Job.updated_at) < cutoff,
            col(Job.provider_request_id).is_(None),
        )
        for job in rows:
            attempt = job.attempts + 1
            held = await asyncio.to_thread(self.core.dispatcher.is_enqueued, job.id, attempt)
            if held:
                continue
            task = self.core.registry.get(job.type)
            if task is None:
                with contextlib.suppress(IllegalTransition, NotFound):
                    await self.core.lifecycle.fail(job.id, "TASK_ERROR", f"unknown type {job.type}", "sweeper")
                continue
            await self.core.dispatcher.aenqueue(job.id, job.queue, attempt, task.timeout_s)
            with contextlib.suppress(IllegalTransition, NotFound):
                await self.core.lifecycle.log(
                    job.id, "re-enqueued: the queue did not hold this job", {"attempt": attempt}, "sweeper"
                )
            report.requeued.append(job.id)

    # ---- retention -------------------------------------------------------------------------

    async def _retention(self, report: SweepReport) -> None:
        cutoff = time.time() - self.core.settings.retention_days * 86400
        await asyncio.to_thread(uploads.expire, self.core.artifacts, cutoff)
        async with self.core.db.read() as s:
            ids = list(
                (
                    await s.execute(
                        select(col(Job.id))
                        .where(col(Job.status).in_(FINAL), col(Job.finished_at) < cutoff)
                        .where(select(col(JobEvent.seq)).where(col(JobEvent.job_id) == col(Job.id)).exists())
                        .limit(BATCH)
                    )
                )
                .scalars()
                .all()
            )
        if not ids:
            return
        async with self.core.db.write() as s:
            await s.execute(delete(JobEvent).where(col(JobEvent.job_id).in_(ids)))
            await s.execute(delete(WebhookDelivery).where(col(WebhookDelivery.job_id).in_(ids)))
        await self.core.aredis.delete(*(keys.event_log(i) for i in ids))
        for job_id in ids:
            await asyncio.to_thread(self.core.artifacts.remove_job, job_id)
        report.purged += ids
