"""Reading jobs and their history (the write side is orchestrator.core.lifecycle)."""

from __future__ import annotations

import base64
import re
from typing import Any

from sqlalchemy import and_, or_, select
from sqlmodel import col

from orchestrator.core.views import event_dict
from orchestrator.errors import BadRequest, NotFound
from orchestrator.store.db import Database
from orchestrator.store.tables import Job, JobEvent

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a job id can look like; anything else is not found without asking the database."""


async def get_job(db: Database, job_id: str, user_id: str | None) -> Job:
    """The job, or NotFound when it does not exist or belongs to someone else."""
    if not JOB_ID.fullmatch(job_id):
        raise NotFound("job not found")
    async with db.read() as s:
        job = await s.get(Job, job_id)
    if job is None or (user_id is not None and job.user_id != user_id):
        raise NotFound("job not found")
    return job


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at!r}|{job.id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, job_id = raw.split("|", 1)
        return float(ts), job_id
    except Exception as exc:
        raise BadRequest("invalid cursor") from exc


async def list_jobs(
    db: Database,
    user_id: str,
    *,
    status: str | None,
    type_: str | None,
    queue: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Job], str | None]:
    q = select(Job).where(col(Job.user_id) == user_id)
    if status:
        q = q.where(col(Job.status) == status)
    if type_:
        q = q.where(col(Job.type) == type_)
    if queue:
        q = q.where(col(Job.queue) == queue)
    if cursor:
        ts, last_id = _decode_cursor(cursor)
        q = q.where(or_(col(Job.created_at) < ts, and_(col(Job.created_at) == ts, col(Job.id) < last_id)))
    q = q.order_by(col(Job.created_at).desc(), col(Job.id).desc()).limit(limit + 1)
    async with db.read() as s:
        rows = list((await s.execute(q)).scalars().all())
    nxt = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], nxt


async def events_after(db: Database, job_id: str, after: int, limit: int = 10_000) -> list[dict[str, Any]]:
    q = (
        select(JobEvent)
        .where(col(JobEvent.job_id) == job_id, col(JobEvent.seq) > after)
        .order_by(col(JobEvent.seq))
        .limit(limit)
    )
    async with db.read() as s:
        return [event_dict(e) for e in (await s.execute(q)).scalars().all()]
