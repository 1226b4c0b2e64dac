"""Users, API keys (stored as SHA-256 hashes: keys are 256-bit random, so no slow hash is needed)
and the credits ledger. The balance always equals the sum of the user's ledger: credits move
only by inserting ledger rows, whose trigger (orchestrator.store.db) moves `users.credits`.

`KeyCache` keeps what an API key resolved to for `ORCH_API_KEY_CACHE_SECONDS` (default 5) per
API process, so a submit does not look its key up in SQL; a key that is revoked or changed keeps
working in a process for at most that long. Unknown keys are not cached (a new key works at once).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Connection, Float, String, bindparam, cast, insert, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from orchestrator.core import secretbox
from orchestrator.core.views import iso
from orchestrator.errors import ApiError, NotFound, ValidationFailed
from orchestrator.store.db import Database, guard
from orchestrator.store.tables import LedgerEntry, User

API_KEY_PREFIX = "ok_"
MAX_CREDIT = 10**12
"""The largest single top-up (or starting balance): far below BIGINT, so no sum overflows."""


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass
class NewUser:
    user_id: str
    name: str
    api_key: str
    webhook_secret: str
    credits: int

    def as_json(self) -> dict[str, Any]:
        return {
            "userId": self.user_id,
            "name": self.name,
            "apiKey": self.api_key,
            "webhookSecret": self.webhook_secret,
            "credits": self.credits,
        }


class UserExists(ApiError):
    status, code = 409, "USER_EXISTS"


USERS = User.__table__  # type: ignore[attr-defined]
LEDGER = LedgerEntry.__table__  # type: ignore[attr-defined]
NO_FLOOR = -(2**62)
"""The balance floor for moves that may take it below zero (refunds never do; top-ups neither)."""

_DELTA = cast(bindparam("delta", type_=BigInteger), BigInteger)
MOVE_CREDITS = (
    insert(LEDGER)
    .from_select(
        ["user_id", "job_id", "delta", "reason", "balance_after", "created_at"],
        select(
            USERS.c.id,
            cast(bindparam("job_id", type_=String), String),
            _DELTA,
            cast(bindparam("reason", type_=String), String),
            USERS.c.credits + _DELTA,
            cast(bindparam("now", type_=Float), Float),
        )
        .where(USERS.c.id == bindparam("user_id"), USERS.c.credits + _DELTA >= bindparam("floor", type_=BigInteger))
        .with_for_update(),
    )
    .returning(LEDGER.c.balance_after)
)
"""A ledger row moving a user's balance by `delta` unless that takes it below `floor`; the
trigger moves `users.credits`. Returns the new balance, or no row."""


def move_credits(conn: Connection, user_id: str, job_id: str | None, delta: int, reason: str, floor: int) -> int | None:
    """Add `delta` to a balance with its ledger row; None if it would go below `floor` (or no user)."""
    row = conn.execute(
        MOVE_CREDITS,
        {"user_id": user_id, "job_id": job_id, "delta": delta, "reason": reason, "now": time.time(), "floor": floor},
    ).first()
    return None if row is None else int(row[0])


async def create_user(db: Database, name: str, credits: int = 0, *, signing_key: str) -> NewUser:
    """The webhook secret is returned in the clear (shown once) and stored sealed (secretbox)."""
    api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    user_id = "usr_" + secrets.token_urlsafe(9)
    row = {
        "id": user_id,
        "name": name,
        "api_key_hash": hash_key(api_key),
        "webhook_secret": secretbox.seal(signing_key, user_id, secret),
        "credits": 0,
        "created_at": time.time(),
    }

    def change(conn: Connection) -> None:
        conn.execute(insert(USERS), row)
        if credits:
            move_credits(conn, user_id, None, credits, "topup", 0)

    try:
        async with guard():
            await db.run_batch(change)
    except IntegrityError as exc:
        raise UserExists(f"a user named {name!r} exists") from exc
    return NewUser(user_id, name, api_key, secret, credits)


async def add_credits(db: Database, name: str, amount: int) -> int:
    """A top-up of 1..MAX_CREDIT credits; anything else is ValidationFailed and changes nothing."""
    if not 1 <= amount <= MAX_CREDIT:
        raise ValidationFailed(f"a top-up must be 1..{MAX_CREDIT} credits, not {amount}")

    def change(conn: Connection) -> int | None:
        user_id = conn.execute(select(USERS.c.id).where(USERS.c.name == bindparam("name")), {"name": name}).scalar()
        if user_id is None:
            return None
        return move_credits(conn, str(user_id), None, amount, "topup", NO_FLOOR)

    async with guard():
        balance = await db.run_batch(change)
    if balance is None:
        raise NotFound(f"no user named {name!r}")
    return balance


class KeyCache:
    """API key hash → user, each entry kept `ttl_s` seconds (0 disables the cache)."""

    MAX_ENTRIES = 10_000

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, User]] = {}
        self.inflight: dict[str, asyncio.Future[User | None]] = {}

    def get(self, key_hash: str) -> User | None:
        hit = self._entries.get(key_hash)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._entries[key_hash]
            return None
        return hit[1]

    def put(self, key_hash: str, user: User) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
        self._entries[key_hash] = (time.monotonic() + self.ttl_s, user)


async def authenticate(db: Database, api_key: str, cache: KeyCache | None = None) -> User | None:
    if not api_key.startswith(API_KEY_PREFIX) or len(api_key) > 200:
        return None
    key_hash = hash_key(api_key)
    if cache is None:
        return await _user_by_key(db, key_hash)
    hit = cache.get(key_hash)
    if hit is not None:
        return hit
    pending = cache.inflight.get(key_hash)
    if pending is not None:  # one lookup per key at a time: the others wait for its answer
        await asyncio.wait([pending])
        if not pending.cancelled() and pending.exception() is None:
            return pending.result()
    fut: asyncio.Future[User | None] = asyncio.get_running_loop().create_future()
    cache.inflight[key_hash] = fut
    try:
        user = await _user_by_key(db, key_hash)
    except BaseException:
        fut.cancel()  # the waiters look it up themselves
        raise
    finally:
        if cache.inflight.get(key_hash) is fut:
            del cache.inflight[key_hash]
    fut.set_result(user)
    if user is not None:
        cache.put(key_hash, user)
    return user


async def _user_by_key(db: Database, key_hash: str) -> User | None:
    async with db.read() as s:
        return (await s.execute(select(User).where(col(User.api_key_hash) == key_hash))).scalar_one_or_none()


async def get_user(db: Database, user_id: str) -> User | None:
    async with db.read() as s:
        return await s.get(User, user_id)


def ledger_entry(e: LedgerEntry) -> dict[str, Any]:
    return {
        "id": str(e.id),
        "jobId": e.job_id,
        "delta": e.delta,
        "reason": e.reason,
        "balanceAfter": e.balance_after,
        "createdAt": iso(e.created_at),
    }


async def ledger(db: Database, user_id: str, limit: int, cursor: int | None) -> tuple[list[LedgerEntry], str | None]:
    """Newest first; the cursor is the last entry id seen."""
    q = select(LedgerEntry).where(col(LedgerEntry.user_id) == user_id)
    if cursor is not None:
        q = q.where(col(LedgerEntry.id) < cursor)
    q = q.order_by(col(LedgerEntry.id).desc()).limit(limit + 1)
    async with db.read() as s:
        rows = list((await s.execute(q)).scalars().all())
    nxt = str(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], nxt
