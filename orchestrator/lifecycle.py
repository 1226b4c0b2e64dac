"""The one owner of a job's life.

Every change of a job goes through `Lifecycle._apply`, which in one SQL transaction:
1. takes the job's row lock and its next `seq` (`UPDATE jobs SET seq = seq + 1 ... RETURNING`,
   which is also what makes SQLite hand out the write lock before anything is read),
2. checks the change against the state machine (an illegal one rolls the whole thing back),
3. writes the job row, the event and, on failed/cancelled/timed_out, the refund,
4. queues webhook deliveries the job asked for,
and only after the commit publishes the event. Routes, workers, the sweeper and providers call
the methods below; none of them writes job state itself.

    queued ──▶ running ──▶ completed | failed | cancelled | timed_out
      │           │
      │           └──▶ queued   (retry: a retryable error or a lost worker, attempts left)
      └──▶ cancelled | failed   (cancel before start; sweeper finding nothing to run it)
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from orchestrator import idempotency
from orchestrator.bus import EventBus, Transition
from orchestrator.db import Database
from orchestrator.errors import Conflict, IllegalTransition, InsufficientCredits, NotFound, Unavailable
from orchestrator.jobs import JOB_ID
from orchestrator.models import Job, JobEvent, LedgerEntry, User, WebhookDelivery
from orchestrator.views import FINAL, event_dict
from orchestrator.webhook_queue import queue_delivery
from queues.dispatch import Dispatcher
from queues.registry import Registry, TaskType

log = logging.getLogger(__name__)

ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"completed", "failed", "cancelled", "timed_out", "queued"}),
}
REFUNDED = frozenset({"failed", "cancelled", "timed_out"})
DEFAULT_WEBHOOK_EVENTS = ("completed", "failed", "cancelled", "timed_out")


def new_job_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits, URL-safe


@dataclass
class Change:
    """What a transition does to a job; `status` None keeps the status (progress or log)."""

    kind: str  # status, progress, log
    status: str | None = None
    progress: float | None = None
    message: str | None = None
    data: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    keep_charge: bool = False


@dataclass
class Applied:
    job: Job
    event: dict[str, Any]


class Lifecycle:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        registry: Registry,
        dispatcher: Dispatcher,
    ) -> None:
        self.db = db
        self.bus = bus
        self.registry = registry
        self.dispatcher = dispatcher
        self._eta_cache: dict[str, tuple[float, float | None]] = {}

    # ---- submit -------------------------------------------------------------------------

    async def submit(
        self,
        user_id: str,
        task: TaskType,
        input_: dict[str, Any],
        *,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
        idempotency_key: str | None = None,
        request_hash: str = "",
    ) -> tuple[Job, bool]:
        """Charge, store and enqueue a job. Returns (job, replayed)."""
        if idempotency_key:
            existing = await idempotency.claim(self.db, user_id, idempotency_key, request_hash)
            if existing is not None:
                async with self.db.read() as s:
                    job = await s.get(Job, existing)
                if job is None:
                    raise NotFound("job not found")
                return job, True
        try:
            job, event = await self._create(user_id, task, input_, webhook_url, webhook_events, idempotency_key)
        except BaseException:
            if idempotency_key:
                await idempotency.release(self.db, user_id, idempotency_key)
            raise
        try:
            await self.dispatcher.aenqueue(job.id, task.queue, 1, task.timeout_s)
        except BaseException as exc:
            await self._undo_create(job, idempotency_key)
            if not isinstance(exc, (RedisError, OSError)):
                raise
            raise Unavailable(f"queue unavailable: {type(exc).__name__}") from exc
        await self.bus.publish(event, Transition(job.queue, job.type, "queued"))
        return job, False

    async def _create(
        self,
        user_id: str,
        task: TaskType,
        input_: dict[str, Any],
        webhook_url: str | None,
        webhook_events: list[str] | None,
        idempotency_key: str | None,
    ) -> tuple[Job, dict[str, Any]]:
        now = time.time()
        job = Job(
            id=new_job_id(),
            user_id=user_id,
            type=task.name,
            queue=task.queue,
            status="queued",
            input=input_,
            seq=1,
            cost=task.cost,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            created_at=now,
            updated_at=now,
            message="queued",
        )
        ev = JobEvent(
            job_id=job.id,
            seq=1,
            type="status",
            status="queued",
            progress=0.0,
            message="queued",
            actor=f"user:{user_id}",
            ts=now,
        )
        async with self.db.write() as s:
            balance = await _move_credits(s, user_id, -task.cost)
            if balance is None:
                raise InsufficientCredits(f"this job costs {task.cost} credits", details={"cost": task.cost})
            s.add(job)
            await s.flush()
            s.add(ev)
            s.add(
                LedgerEntry(
                    user_id=user_id,
                    job_id=job.id,
                    delta=-task.cost,
                    reason="charge",
                    balance_after=balance,
                    created_at=now,
                )
            )
            if idempotency_key:
                await idempotency.attach(s, user_id, idempotency_key, job.id)
            event = event_dict(ev)
            await self._queue_webhook(s, job, event)
        return job, event

    async def _undo_create(self, job: Job, idempotency_key: str | None) -> None:
        """The enqueue failed: take the job back as if it was never submitted."""
        async with self.db.write() as s:
            await _move_credits(s, job.user_id, job.cost, allow_negative=True)
            await s.execute(delete(WebhookDelivery).where(col(WebhookDelivery.job_id) == job.id))
            await s.execute(delete(JobEvent).where(col(JobEvent.job_id) == job.id))
            await s.execute(delete(LedgerEntry).where(col(LedgerEntry.job_id) == job.id))
            await s.flush()
            if idempotency_key:
                await idempotency.drop(s, job.user_id, idempotency_key)
            stored = await s.get(Job, job.id)
            if stored is not None:
                await s.delete(stored)

    # ---- transitions ---------------------------------------------------------------------

    async def start(self, job_id: str, actor: str, worker_name: str = "") -> Job | None:
        """queued → running. None when the job must not run (cancelled, finished, unknown)."""
        try:
            applied = await self._apply(job_id, actor, lambda j: self._start_change(j, worker_name))
        except (IllegalTransition, NotFound):
            return None
        return applied.job

    def _start_change(self, job: Job, worker_name: str) -> Change:
        now = time.time()
        attempt = job.attempts + 1
        return Change(
            "status",
            status="running",
            progress=0.0,
            message="running" if attempt == 1 else f"running (attempt {attempt})",
            data={"attempt": attempt},
            fields={"attempts": attempt, "started_at": now, "worker_name": worker_name, "eta_seconds": None},
        )

    async def progress(
        self,
        job_id: str,
        progress: float,
        message: str | None,
        data: dict[str, Any] | None,
        actor: str,
        attempt: int | None = None,
    ) -> Applied:
        return await self._apply(
            job_id,
            actor,
            lambda j: Change("progress", progress=progress, message=message, data=data),
            attempt,
        )

    async def log(
        self, job_id: str, message: str, data: dict[str, Any] | None, actor: str, attempt: int | None = None
    ) -> Applied:
        return await self._apply(job_id, actor, lambda j: Change("log", message=message, data=data), attempt)

    async def complete(self, job_id: str, result: dict[str, Any], actor: str, attempt: int | None = None) -> Applied:
        return await self._apply(
            job_id,
            actor,
            lambda j: Change(
                "status",
                status="completed",
                progress=100.0,
                message="completed",
                data={"result": result},
                result=result,
            ),
            attempt,
        )

    async def fail(
        self,
        job_id: str,
        code: str,
        message: str,
        actor: str,
        status: str = "failed",
        attempt: int | None = None,
    ) -> Applied:
        return await self._apply(
            job_id,
            actor,
            lambda j: Change("status", status=status, message=message, error={"code": code, "message": message}),
            attempt,
        )

    async def handoff(self, job_id: str, provider: str, request_id: str, actor: str) -> Applied:
        """Record that a provider now runs the job (it starts and ends by the provider's word)."""
        return await self._apply(
            job_id,
            actor,
            lambda j: Change(
                "log",
                message=f"submitted to {provider}",
                data={"provider": provider, "requestId": request_id},
                fields={"provider_request_id": request_id},
            ),
        )

    async def retry(self, job_id: str, reason: str, actor: str, delay_s: float, attempt: int | None = None) -> Applied:
        """running → queued for another attempt; the caller enqueues it after this returns."""
        applied = await self._apply(
            job_id,
            actor,
            lambda j: Change(
                "status",
                status="queued",
                progress=0.0,
                message=f"retrying: {reason}",
                data={
                    "attempt": j.attempts,
                    "nextAttempt": j.attempts + 1,
                    "delaySeconds": delay_s,
                    "reason": reason,
                },
            ),
            attempt,
        )
        task = self.registry.get(applied.job.type)
        timeout = task.timeout_s if task else 3600
        try:
            await self.dispatcher.aenqueue(job_id, applied.job.queue, applied.job.attempts + 1, timeout, delay_s)
        except (RedisError, OSError) as exc:  # the sweeper enqueues queued rows that Redis lacks
            log.warning("re-enqueue of %s failed (%s); the sweeper will retry", job_id, exc)
        return applied

    async def lose(self, job_id: str, attempt: int, reason: str, actor: str = "sweeper") -> Applied:
        """The attempt's worker is gone: retry when the type allows more attempts, else fail."""
        async with self.db.read() as s:
            job = await s.get(Job, job_id)
        if job is None:
            raise NotFound("job not found")
        task = self.registry.get(job.type)
        if task is not None and attempt < task.max_attempts:
            return await self.retry(job_id, reason, actor, task.backoff_s(attempt), attempt)
        return await self.fail(job_id, "WORKER_LOST", reason, actor, attempt=attempt)

    async def cancel(self, job_id: str, user_id: str | None, actor: str) -> Job:
        """Cancel a queued or running job of `user_id` (any user's when None), and stop it."""

        def change(job: Job) -> Change:
            if user_id is not None and job.user_id != user_id:
                raise NotFound("job not found")
            if job.status in FINAL:
                raise Conflict(f"job is already {job.status}", code="JOB_FINISHED")
            return Change(
                "status",
                status="cancelled",
                message="cancelled",
                error={"code": "CANCELLED", "message": "cancelled by " + actor},
            )

        applied = await self._apply(job_id, actor, change)
        job = applied.job
        await self.dispatcher.astop(job.id, job.attempts if job.started_at else job.attempts + 1)
        if job.started_at is not None:
            await self.dispatcher.astop(job.id, job.attempts + 1)
        task = self.registry.get(job.type)
        hook = task.extra.get("on_cancel") if task is not None else None
        if hook is not None and job.provider_request_id:
            try:
                await hook(job)  # e.g. cancel the provider's request
            except Exception as exc:
                log.warning("provider cancel of %s failed: %s", job.id, exc)
        return job

    async def keep_charge(self, job_id: str, message: str, data: dict[str, Any] | None, actor: str) -> Applied:
        """A cancelled job that its provider ran to the end anyway (and billed): take its refund
        back, once (ledger `charge_kept`), with a `log` event saying so. The status stays."""

        def change(job: Job) -> Change:
            if job.status != "cancelled" or job.refunded <= 0:
                raise IllegalTransition(f"job {job_id} has no refund to take back")
            return Change("log", message=message, data=data, keep_charge=True)

        return await self._apply(job_id, actor, change)

    # ---- the one writer --------------------------------------------------------------------

    async def _apply(
        self, job_id: str, actor: str, decide: Callable[[Job], Change], attempt: int | None = None
    ) -> Applied:
        """Apply one change. `attempt`, when given, must be the job's current attempt: a stale
        attempt (an orphaned work horse, a retried job) can no longer write."""
        if not JOB_ID.fullmatch(job_id):
            raise NotFound("job not found")
        now = time.time()
        transition: Transition | None = None
        async with self.db.write() as s:
            job = (
                await s.execute(update(Job).where(col(Job.id) == job_id).values(seq=col(Job.seq) + 1).returning(Job))
            ).scalar_one_or_none()
            if job is None:
                raise NotFound("job not found")
            old_status = job.status
            if attempt is not None and job.attempts != attempt:
                raise IllegalTransition(f"attempt {attempt} is stale (job is on attempt {job.attempts})")
            change = decide(job)
            if old_status in FINAL and not change.keep_charge:
                raise IllegalTransition(f"job {job_id} is {old_status}")
            if change.status is not None and change.status not in ALLOWED[old_status]:
                raise IllegalTransition(f"{old_status} → {change.status}")
            if change.status is None and change.kind == "progress" and old_status != "running":
                # progress before start (a provider's queue position) keeps 0
                change.progress = job.progress
            for k, v in change.fields.items():
                setattr(job, k, v)
            if change.progress is not None:
                p = min(100.0, max(0.0, float(change.progress)))
                # never goes down within an attempt; a new attempt (running/queued again) resets
                job.progress = p if change.status in ("running", "queued") else max(job.progress, p)
            if change.message is not None:
                job.message = change.message[:1000]
            if change.kind == "progress":
                job.eta_seconds = await self._eta(s, job, now)
            new_status = change.status or old_status
            if change.status is not None and change.status != old_status:
                job.status = change.status
                transition = self._transition(job, old_status, now)
            if change.status in FINAL:
                job.finished_at = now
                job.eta_seconds = None
                if change.status == "completed":
                    job.result = change.result
                    job.progress = 100.0
                else:
                    job.error = change.error
            job.updated_at = now
            if change.status in REFUNDED and job.refunded == 0 and job.cost > 0:
                await self._refund(s, job, now)
            if change.keep_charge:
                await self._refund(s, job, now, taken_back=True)
            ev = JobEvent(
                job_id=job.id,
                seq=job.seq,
                type=change.kind,
                status=new_status,
                progress=job.progress,
                message=change.message,
                data=change.data,
                error=change.error if change.kind == "status" else None,
                actor=actor,
                eta_seconds=job.eta_seconds if change.kind == "progress" else None,
                ts=now,
            )
            s.add(ev)
            event = event_dict(ev)
            await self._queue_webhook(s, job, event)
        await self.bus.publish(event, transition)
        return Applied(job, event)

    def _transition(self, job: Job, old_status: str, now: float) -> Transition:
        wait = duration = None
        if job.status == "running":
            wait = now - job.created_at if job.attempts <= 1 else None
        elif job.status in FINAL and old_status == "running" and job.started_at:
            duration = now - job.started_at
        return Transition(job.queue, job.type, job.status, wait, duration)

    async def _refund(self, s: AsyncSession, job: Job, now: float, taken_back: bool = False) -> None:
        delta = -job.refunded if taken_back else job.cost
        balance = await _move_credits(s, job.user_id, delta, allow_negative=True)
        assert balance is not None
        s.add(
            LedgerEntry(
                user_id=job.user_id,
                job_id=job.id,
                delta=delta,
                reason="charge_kept" if taken_back else "refund",
                balance_after=balance,
                created_at=now,
            )
        )
        job.refunded = 0 if taken_back else job.cost
        try:
            await s.flush()
        except IntegrityError as exc:  # the unique (job, reason) index: refunded already
            raise IllegalTransition("refund already recorded") from exc

    async def _queue_webhook(self, s: AsyncSession, job: Job, event: dict[str, Any]) -> None:
        if not job.webhook_url:
            return
        wanted = job.webhook_events or DEFAULT_WEBHOOK_EVENTS
        # status events by their status; progress events when "progress" is asked for; never logs
        if (event["type"] == "progress" and "progress" in wanted) or (
            event["type"] == "status" and event["status"] in wanted
        ):
            await queue_delivery(s, job, event)

    async def _eta(self, s: AsyncSession, job: Job, now: float) -> float | None:
        """Remaining seconds: the job's own rate, blended early on with past jobs of its type."""
        own = None
        if job.started_at and job.progress > 0:
            elapsed = now - job.started_at
            own = elapsed * (100.0 - job.progress) / job.progress
        typical = await self._typical_duration(s, job.type, now)
        if typical is not None and job.started_at:
            hist = max(0.0, typical - (now - job.started_at))
            if own is None:
                return round(hist, 2)
            w = job.progress / 100.0
            return round(w * own + (1 - w) * hist, 2)
        return round(own, 2) if own is not None else None

    async def _typical_duration(self, s: AsyncSession, task_type: str, now: float) -> float | None:
        cached = self._eta_cache.get(task_type)
        if cached and now - cached[0] < 60:
            return cached[1]
        recent = (
            select((col(Job.finished_at) - col(Job.started_at)).label("d"))
            .where(col(Job.type) == task_type, col(Job.status) == "completed", col(Job.started_at).is_not(None))
            .order_by(col(Job.finished_at).desc())
            .limit(20)
            .subquery()
        )
        value = (await s.execute(select(func.avg(recent.c.d)))).scalar()
        typical = float(value) if value is not None else None
        self._eta_cache[task_type] = (now, typical)
        return typical


async def _move_credits(s: AsyncSession, user_id: str, delta: int, allow_negative: bool = False) -> int | None:
    """Add `delta` to a balance atomically; None if it would go below zero (or no such user)."""
    stmt = update(User).where(col(User.id) == user_id)
    if not allow_negative and delta < 0:
        stmt = stmt.where(col(User.credits) >= -delta)
    row = (await s.execute(stmt.values(credits=col(User.credits) + delta).returning(col(User.credits)))).first()
    return None if row is None else int(row[0])
