"""The one owner of a job's life.

Every change of a job is a synchronous function over SQLAlchemy Core statements built once at
import (the engine caches their compiled form), run by the process's `GroupCommit`: the changes
that arrive meanwhile share one transaction, each in a SAVEPOINT, one commit, then one Redis
pipeline with every event they announce. `_apply` is the change for a transition:
1. reads the job's row (`SELECT ... FOR UPDATE` on Postgres; SQLite's `BEGIN IMMEDIATE` already
   holds the write lock) and takes its next `seq`,
2. checks the change against the state machine and the attempt (a refused change raises to its
   caller alone; nothing of it was written),
3. writes the job row, the event and, on failed/cancelled/timed_out, the refund,
4. hands the event to each durable channel (webhooks: an outbox row, see core.ports),
and the event is published only after the commit. Routes, workers, the sweeper and providers
call the methods below; none of them writes job state itself.

A submit is three statements in one transaction: the charge (`INSERT INTO ledger ... SELECT ...
FROM users WHERE credits + delta >= 0`, locking the user's row on Postgres; the ledger trigger in
orchestrator.store.db moves `users.credits` in the same statement, so the balance is the sum of the
ledger and concurrent submits cannot take it below zero), the job, its first event. An
idempotent submit adds a fourth (attach the key), a webhook a fifth (its outbox row). We chose
the trigger over a Postgres CTE because it is one statement on SQLite and Postgres alike. The
enqueue (RQ's own job hash and queue push, see queues.dispatch) goes out in the same Redis
pipeline as the `queued` event, after the commit; if that pipeline fails the job is taken back
(charge, job and event deleted; the delete trigger restores the balance) and the caller gets 503.

The statuses and the moves between them are orchestrator.states'.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import configure_mappers
from sqlalchemy.orm.base import manager_of_class

from orchestrator.core import idempotency
from orchestrator.core.accounts import NO_FLOOR, move_credits
from orchestrator.core.bus import EventBus, Transition
from orchestrator.core.jobs import JOB_ID
from orchestrator.core.ports import Dispatcher, DurableChannel
from orchestrator.core.tasktypes import Registry, TaskType
from orchestrator.core.views import event_from_row
from orchestrator.errors import Conflict, IllegalTransition, InsufficientCredits, NotFound, Unavailable
from orchestrator.states import FINAL, REFUNDED, allowed
from orchestrator.store.db import Database, guard
from orchestrator.store.group_commit import Announce, Done, GroupCommit
from orchestrator.store.tables import Job, JobEvent, LedgerEntry

log = logging.getLogger(__name__)

JOBS = Job.__table__  # type: ignore[attr-defined]
EVENTS = JobEvent.__table__  # type: ignore[attr-defined]
LEDGER = LedgerEntry.__table__  # type: ignore[attr-defined]

MUTABLE = (
    "status",
    "progress",
    "message",
    "result",
    "error",
    "attempts",
    "seq",
    "refunded",
    "eta_seconds",
    "provider_request_id",
    "worker_name",
    "started_at",
    "finished_at",
    "updated_at",
)
SELECT_JOB = select(JOBS).where(JOBS.c.id == bindparam("job_id")).with_for_update()
UPDATE_JOB = update(JOBS).where(JOBS.c.id == bindparam("job_id"))
INSERT_JOB = insert(JOBS)
INSERT_EVENT = insert(EVENTS)
_recent = (
    select((JOBS.c.finished_at - JOBS.c.started_at).label("d"))
    .where(JOBS.c.type == bindparam("type"), JOBS.c.status == "completed", JOBS.c.started_at.is_not(None))
    .order_by(JOBS.c.finished_at.desc())
    .limit(20)
    .subquery()
)
TYPICAL_DURATION = select(func.avg(_recent.c.d))
configure_mappers()
_JOB_MANAGER = manager_of_class(Job)


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
    """Take a final job's refund back (the provider ran and billed it anyway): the one change a
    final job still accepts."""


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
        channels: Sequence[DurableChannel] = (),
    ) -> None:
        self.db = db
        self.channels = tuple(channels)
        self.bus = bus
        self.registry = registry
        self.dispatcher = dispatcher
        self.writer = GroupCommit(db, bus.send)
        self._eta_cache: dict[str, tuple[float, float | None]] = {}
        self._prepared = False

    async def _run(self, change: Callable[[Connection], Done[Any]]) -> tuple[Any, bool]:
        async with guard():
            return await self.writer.run(change)

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
        await self._prepare_queues()
        if idempotency_key:
            existing = await self._claim(user_id, idempotency_key, request_hash)
            if existing is not None:
                async with self.db.read() as s:
                    job = await s.get(Job, existing)
                if job is None:
                    raise NotFound("job not found")
                return job, True
        try:
            (job, _event), sent = await self._run(
                self._create(user_id, task, input_, webhook_url, webhook_events, idempotency_key)
            )
        except BaseException:
            if idempotency_key:
                await self._release(user_id, idempotency_key)
            raise
        if not sent:
            await self._run(self._undo_create(job, idempotency_key))
            raise Unavailable("queue unavailable: Redis did not take the job")
        return job, False

    async def _prepare_queues(self) -> None:
        """Once per process: what RQ needs to know to write an enqueue without asking Redis."""
        if self._prepared:
            return
        try:
            await self.dispatcher.prepare(self.bus.redis, sorted({t.queue for t in self.registry.all()}))
        except Exception as exc:
            raise Unavailable(f"queue unavailable: {type(exc).__name__}") from exc
        self._prepared = True

    async def _claim(self, user_id: str, key: str, request_hash: str) -> str | None:
        for _ in range(3):
            try:
                job_id, _sent = await self._run(idempotency.claim(user_id, key, request_hash))
                return job_id
            except IntegrityError:
                continue  # a concurrent first request inserted it; look again
        raise Conflict("a request with this Idempotency-Key is in progress", code="IDEMPOTENCY_KEY_IN_USE")

    async def _release(self, user_id: str, key: str) -> None:
        try:
            await self._run(idempotency.release(user_id, key))
        except Exception:  # the key expires anyway; nothing was charged
            pass

    def _create(
        self,
        user_id: str,
        task: TaskType,
        input_: dict[str, Any],
        webhook_url: str | None,
        webhook_events: list[str] | None,
        idempotency_key: str | None,
    ) -> Callable[[Connection], Done[tuple[Job, dict[str, Any]]]]:
        now = time.time()
        values: dict[str, Any] = {
            "id": new_job_id(),
            "user_id": user_id,
            "type": task.name,
            "queue": task.queue,
            "status": "queued",
            "progress": 0.0,
            "message": "queued",
            "input": input_,
            "result": None,
            "error": None,
            "attempts": 0,
            "seq": 1,
            "cost": task.cost,
            "refunded": 0,
            "eta_seconds": None,
            "webhook_url": webhook_url,
            "webhook_events": webhook_events,
            "provider_request_id": None,
            "worker_name": None,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "updated_at": now,
        }
        job = job_from_row(values)
        ev = _event_row(job.id, 1, "status", "queued", 0.0, "queued", None, None, f"user:{user_id}", None, now)
        event = event_from_row(ev)

        def change(conn: Connection) -> Done[tuple[Job, dict[str, Any]]]:
            if move_credits(conn, user_id, job.id, -task.cost, "charge", 0) is None:
                raise InsufficientCredits(f"this job costs {task.cost} credits", details={"cost": task.cost})
            conn.execute(INSERT_JOB, values)
            conn.execute(INSERT_EVENT, ev)
            if idempotency_key:
                idempotency.attach(conn, user_id, idempotency_key, job.id)
            self._record_durable(conn, job, event)
            return Done(
                (job, event),
                [
                    lambda pipe: self.dispatcher.add_enqueue(pipe, job.id, task.queue, 1, task.timeout_s),
                    lambda pipe: self.bus.add_event(pipe, event, Transition(job.queue, job.type, "queued")),
                ],
            )

        return change

    def _undo_create(self, job: Job, idempotency_key: str | None) -> Callable[[Connection], Done[None]]:
        """The enqueue failed: take the job back as if it was never submitted (the ledger's
        delete trigger gives the charge back)."""

        def change(conn: Connection) -> Done[None]:
            for channel in self.channels:
                channel.forget(conn, job.id)
            conn.execute(delete(EVENTS).where(EVENTS.c.job_id == job.id))
            conn.execute(delete(LEDGER).where(LEDGER.c.job_id == job.id))
            if idempotency_key:
                idempotency.drop(conn, job.user_id, idempotency_key)
            conn.execute(delete(JOBS).where(JOBS.c.id == job.id))
            return Done(None)

        return change

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
        """running → queued for another attempt, enqueued in the same Redis round trip as its event
        (if Redis fails, the sweeper enqueues queued rows that Redis lacks)."""

        def enqueue(job: Job) -> Announce:
            task = self.registry.get(job.type)
            timeout = task.timeout_s if task else 3600
            return lambda pipe: self.dispatcher.add_enqueue(pipe, job_id, job.queue, job.attempts + 1, timeout, delay_s)

        await self._prepare_queues()
        return await self._apply(
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
            then=enqueue,
        )

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
        await self.cancel_at_provider(job)
        return job

    async def cancel_at_provider(self, job: Job) -> None:
        """Ask the provider that runs `job` (if any) to stop it: its type's `on_cancel` hook.
        Best effort: the job is already final here."""
        task = self.registry.get(job.type)
        hook = task.extra.get("on_cancel") if task is not None else None
        if hook is None or not job.provider_request_id:
            return
        try:
            await hook(job)
        except Exception as exc:
            log.warning("provider cancel of %s failed: %s", job.id, exc)

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
        self,
        job_id: str,
        actor: str,
        decide: Callable[[Job], Change],
        attempt: int | None = None,
        then: Callable[[Job], Announce] | None = None,
    ) -> Applied:
        """Apply one change. `attempt`, when given, must be the job's current attempt: a stale
        attempt (an orphaned task, a retried job) can no longer write. `then` adds Redis
        writes to the event's pipeline."""
        if not JOB_ID.fullmatch(job_id):
            raise NotFound("job not found")
        applied, sent = await self._run(lambda conn: self._change(conn, job_id, actor, decide, attempt, then))
        if not sent:
            log.warning("announcing %s/%s failed; it is stored", job_id, applied.event["seq"])
        return applied

    def _change(
        self,
        conn: Connection,
        job_id: str,
        actor: str,
        decide: Callable[[Job], Change],
        attempt: int | None,
        then: Callable[[Job], Announce] | None,
    ) -> Done[Applied]:
        now = time.time()
        row = conn.execute(SELECT_JOB, {"job_id": job_id}).mappings().first()
        if row is None:
            raise NotFound("job not found")
        job = job_from_row(row)
        v = job.__dict__  # the job's values, changed in place below (it is in no ORM session)
        old_status = v["status"]
        if attempt is not None and v["attempts"] != attempt:
            raise IllegalTransition(f"attempt {attempt} is stale (job is on attempt {v['attempts']})")
        change = decide(job)
        if old_status in FINAL and not change.keep_charge:
            raise IllegalTransition(f"job {job_id} is {old_status}")
        if change.status is not None and not allowed(old_status, change.status):
            raise IllegalTransition(f"{old_status} → {change.status}")
        if change.status is None and change.kind == "progress" and old_status != "running":
            # progress before start (a provider's queue position) keeps 0
            change.progress = v["progress"]
        v["seq"] += 1
        v.update(change.fields)
        if change.progress is not None:
            p = min(100.0, max(0.0, float(change.progress)))
            # never goes down within an attempt; a new attempt (running/queued again) resets
            v["progress"] = p if change.status in ("running", "queued") else max(v["progress"], p)
        if change.message is not None:
            v["message"] = change.message[:1000]
        if change.kind == "progress":
            v["eta_seconds"] = self._eta(conn, job, now)
        new_status = change.status or old_status
        transition: Transition | None = None
        if change.status is not None and change.status != old_status:
            v["status"] = change.status
            transition = self._transition(job, old_status, now)
        if change.status in FINAL:
            v["finished_at"] = now
            v["eta_seconds"] = None
            if change.status == "completed":
                v["result"] = change.result
                v["progress"] = 100.0
            else:
                v["error"] = change.error
        v["updated_at"] = now
        if change.status in REFUNDED and v["refunded"] == 0 and v["cost"] > 0:
            if move_credits(conn, v["user_id"], job_id, v["cost"], "refund", NO_FLOOR) is None:
                raise NotFound("the job's user is gone")
            v["refunded"] = v["cost"]
        if change.keep_charge:
            if move_credits(conn, v["user_id"], job_id, -v["refunded"], "charge_kept", NO_FLOOR) is None:
                raise NotFound("the job's user is gone")
            v["refunded"] = 0
        conn.execute(UPDATE_JOB, {"job_id": job_id, **{k: v[k] for k in MUTABLE}})
        ev = _event_row(
            job_id,
            v["seq"],
            change.kind,
            new_status,
            v["progress"],
            change.message,
            change.data,
            change.error if change.kind == "status" else None,
            actor,
            v["eta_seconds"] if change.kind == "progress" else None,
            now,
        )
        conn.execute(INSERT_EVENT, ev)
        event = event_from_row(ev)
        self._record_durable(conn, job, event)
        announce: list[Announce] = [lambda pipe: self.bus.add_event(pipe, event, transition)]
        if then is not None:
            announce.append(then(job))
        return Done(Applied(job, event), announce)

    def _transition(self, job: Job, old_status: str, now: float) -> Transition:
        wait = duration = None
        if job.status == "running":
            wait = now - job.created_at if job.attempts <= 1 else None
        elif job.status in FINAL and old_status == "running" and job.started_at:
            duration = now - job.started_at
        return Transition(job.queue, job.type, job.status, wait, duration)

    def _record_durable(self, conn: Connection, job: Job, event: dict[str, Any]) -> None:
        for channel in self.channels:
            channel.record(conn, job, event)

    def _eta(self, conn: Connection, job: Job, now: float) -> float | None:
        """Remaining seconds: the job's own rate, blended early on with past jobs of its type."""
        own = None
        if job.started_at and job.progress > 0:
            elapsed = now - job.started_at
            own = elapsed * (100.0 - job.progress) / job.progress
        typical = self._typical_duration(conn, job.type, now)
        if typical is not None and job.started_at:
            hist = max(0.0, typical - (now - job.started_at))
            if own is None:
                return round(hist, 2)
            w = job.progress / 100.0
            return round(w * own + (1 - w) * hist, 2)
        return round(own, 2) if own is not None else None

    def _typical_duration(self, conn: Connection, task_type: str, now: float) -> float | None:
        cached = self._eta_cache.get(task_type)
        if cached and now - cached[0] < 60:
            return cached[1]
        value = conn.execute(TYPICAL_DURATION, {"type": task_type}).scalar()
        typical = float(value) if value is not None else None
        self._eta_cache[task_type] = (now, typical)
        return typical


def job_from_row(row: Mapping[Any, Any]) -> Job:
    """A `Job` holding a row's values, built the way the ORM loads one (no validation, no
    per-attribute events): ten times cheaper than `Job(**row)` on the hot path."""
    job: Job = _JOB_MANAGER.new_instance()
    job.__dict__.update(row)
    object.__setattr__(job, "__pydantic_fields_set__", set(row))
    object.__setattr__(job, "__pydantic_extra__", None)
    object.__setattr__(job, "__pydantic_private__", None)
    return job


def _event_row(
    job_id: str,
    seq: int,
    kind: str,
    status: str,
    progress: float,
    message: str | None,
    data: dict[str, Any] | None,
    error: dict[str, Any] | None,
    actor: str,
    eta_seconds: float | None,
    ts: float,
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "seq": seq,
        "type": kind,
        "status": status,
        "progress": progress,
        "message": message,
        "data": data,
        "error": error,
        "actor": actor,
        "eta_seconds": eta_seconds,
        "ts": ts,
    }
