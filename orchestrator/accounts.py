"""Users, API keys (stored as SHA-256 hashes: keys are 256-bit random, so no slow hash is needed)
and the credits ledger. The balance always equals the sum of the user's ledger."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from orchestrator import secretbox
from orchestrator.db import Database
from orchestrator.errors import ApiError, NotFound, ValidationFailed
from orchestrator.models import LedgerEntry, User
from orchestrator.views import iso

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


async def create_user(db: Database, name: str, credits: int = 0, *, signing_key: str) -> NewUser:
    """The webhook secret is returned in the clear (shown once) and stored sealed (secretbox)."""
    api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    now = time.time()
    user_id = "usr_" + secrets.token_urlsafe(9)
    user = User(
        id=user_id,
        name=name,
        api_key_hash=hash_key(api_key),
        webhook_secret=secretbox.seal(signing_key, user_id, secret),
        credits=0,
        created_at=now,
    )
    try:
        async with db.write() as s:
            s.add(user)
            await s.flush()
            if credits:
                user.credits = credits
                s.add(
                    LedgerEntry(
                        user_id=user.id,
                        job_id=None,
                        delta=credits,
                        reason="topup",
                        balance_after=credits,
                        created_at=now,
                    )
                )
    except IntegrityError as exc:
        raise UserExists(f"a user named {name!r} exists") from exc
    return NewUser(user.id, name, api_key, secret, credits)


async def add_credits(db: Database, name: str, amount: int) -> int:
    """A top-up of 1..MAX_CREDIT credits; anything else is ValidationFailed and changes nothing."""
    if not 1 <= amount <= MAX_CREDIT:
        raise ValidationFailed(f"a top-up must be 1..{MAX_CREDIT} credits, not {amount}")
    now = time.time()
    async with db.write() as s:
        row = (
            await s.execute(
                update(User)
                .where(col(User.name) == name)
                .values(credits=col(User.credits) + amount)
                .returning(col(User.id), col(User.credits))
            )
        ).first()
        if row is None:
            raise NotFound(f"no user named {name!r}")
        s.add(
            LedgerEntry(
                user_id=row[0],
                job_id=None,
                delta=amount,
                reason="topup",
                balance_after=int(row[1]),
                created_at=now,
            )
        )
        return int(row[1])


async def authenticate(db: Database, api_key: str) -> User | None:
    if not api_key.startswith(API_KEY_PREFIX) or len(api_key) > 200:
        return None
    async with db.read() as s:
        return (await s.execute(select(User).where(col(User.api_key_hash) == hash_key(api_key)))).scalar_one_or_none()


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
