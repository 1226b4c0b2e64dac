"""Idempotency-Key handling for submits (IETF draft semantics), scoped to the user.

claim → (first request) a row without a job id is committed, so a concurrent duplicate sees
it and gets 409; the submit transaction then attaches the job id. A failed submit releases
the key. Same key + same body within 24 h replays the job; another body is 422.
"""

from __future__ import annotations

import time

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from orchestrator.db import Database
from orchestrator.errors import Conflict, ValidationFailed
from orchestrator.models import IdempotencyKey

KEY_TTL_S = 24 * 3600
MAX_KEY_LENGTH = 255


async def claim(db: Database, user_id: str, key: str, request_hash: str) -> str | None:
    """Returns the job id to replay, or None when this request owns the key now."""
    now = time.time()
    for _ in range(3):
        try:
            async with db.write() as s:
                row = await s.get(IdempotencyKey, (user_id, key))
                if row is not None and row.created_at < now - KEY_TTL_S:
                    await s.delete(row)
                    await s.flush()
                    row = None
                if row is None:
                    s.add(IdempotencyKey(user_id=user_id, key=key, request_hash=request_hash, created_at=now))
                    return None
                if row.request_hash != request_hash:
                    raise ValidationFailed(
                        "this Idempotency-Key was used with another request body",
                        code="IDEMPOTENCY_KEY_REUSED",
                    )
                if row.job_id is None:
                    raise Conflict("a request with this Idempotency-Key is in progress", code="IDEMPOTENCY_KEY_IN_USE")
                return row.job_id
        except IntegrityError:
            continue  # a concurrent first request inserted it; look again
    raise Conflict("a request with this Idempotency-Key is in progress", code="IDEMPOTENCY_KEY_IN_USE")


async def attach(s: AsyncSession, user_id: str, key: str, job_id: str) -> None:
    await s.execute(
        update(IdempotencyKey)
        .where(col(IdempotencyKey.user_id) == user_id, col(IdempotencyKey.key) == key)
        .values(job_id=job_id)
    )


async def drop(s: AsyncSession, user_id: str, key: str) -> None:
    await s.execute(
        delete(IdempotencyKey).where(col(IdempotencyKey.user_id) == user_id, col(IdempotencyKey.key) == key)
    )


async def release(db: Database, user_id: str, key: str) -> None:
    try:
        async with db.write() as s:
            await drop(s, user_id, key)
    except Exception:  # the key expires anyway; nothing was charged
        pass
