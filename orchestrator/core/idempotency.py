"""Idempotency-Key handling for submits (IETF draft semantics), scoped to the user.

claim → (first request) a row without a job id is committed, so a concurrent duplicate sees
it and gets 409; the submit transaction then attaches the job id (its fourth statement). A
failed submit releases the key. Same key + same body within 24 h replays the job; another body
is 422. Each function here is a change for `GroupCommit.run` (orchestrator.store.group_commit).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from orchestrator.errors import Conflict, ValidationFailed
from orchestrator.store.group_commit import Done
from orchestrator.store.tables import IdempotencyKey

KEY_TTL_S = 24 * 3600
MAX_KEY_LENGTH = 255

KEYS = IdempotencyKey.__table__  # type: ignore[attr-defined]
_WHERE = (KEYS.c.user_id == bindparam("u"), KEYS.c.key == bindparam("k"))
SELECT_KEY = select(KEYS.c.request_hash, KEYS.c.job_id, KEYS.c.created_at).where(*_WHERE)
INSERT_KEY = insert(KEYS)
ATTACH_JOB = update(KEYS).where(*_WHERE).values(job_id=bindparam("job_id"))
DROP_KEY = delete(KEYS).where(*_WHERE)


def claim(user_id: str, key: str, request_hash: str) -> Callable[[Connection], Done[str | None]]:
    """The job id to replay, or None when this request owns the key now. A concurrent first
    request in another process shows as an IntegrityError: the caller asks again."""

    def change(conn: Connection) -> Done[str | None]:
        now = time.time()
        row = conn.execute(SELECT_KEY, {"u": user_id, "k": key}).first()
        if row is not None and row.created_at < now - KEY_TTL_S:
            conn.execute(DROP_KEY, {"u": user_id, "k": key})
            row = None
        if row is None:
            conn.execute(
                INSERT_KEY,
                {"user_id": user_id, "key": key, "request_hash": request_hash, "job_id": None, "created_at": now},
            )
            return Done(None)
        if row.request_hash != request_hash:
            raise ValidationFailed(
                "this Idempotency-Key was used with another request body", code="IDEMPOTENCY_KEY_REUSED"
            )
        if row.job_id is None:
            raise Conflict("a request with this Idempotency-Key is in progress", code="IDEMPOTENCY_KEY_IN_USE")
        return Done(str(row.job_id))

    return change


def attach(conn: Connection, user_id: str, key: str, job_id: str) -> None:
    conn.execute(ATTACH_JOB, {"u": user_id, "k": key, "job_id": job_id})


def drop(conn: Connection, user_id: str, key: str) -> None:
    conn.execute(DROP_KEY, {"u": user_id, "k": key})


def release(user_id: str, key: str) -> Callable[[Connection], Done[None]]:
    def change(conn: Connection) -> Done[None]:
        drop(conn, user_id, key)
        return Done(None)

    return change
