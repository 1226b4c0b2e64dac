"""Who is calling: an API key (full access) or a subscribe token (read events of some jobs)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeSerializer

from orchestrator.core import accounts
from orchestrator.errors import Unauthorized
from orchestrator.store.db import Database

TOKEN_SALT = "orchestrator.subscribe"
TOKEN_PREFIX = "st_"


@dataclass(frozen=True)
class Principal:
    user_id: str
    name: str
    job_ids: frozenset[str] | None = None  # for subscribe tokens limited to some jobs
    subscribe_only: bool = False

    def may_read(self, job_id: str) -> bool:
        return self.job_ids is None or job_id in self.job_ids


class Tokens:
    def __init__(self, key: str) -> None:
        self._s = URLSafeSerializer(key, salt=TOKEN_SALT)

    def issue(self, user_id: str, job_ids: list[str] | None, ttl_s: int) -> tuple[str, float]:
        exp = time.time() + ttl_s
        return TOKEN_PREFIX + self._s.dumps({"u": user_id, "j": job_ids, "e": exp}), exp

    def verify(self, token: str) -> tuple[str, frozenset[str] | None]:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 8192 or not token.isascii():
            raise Unauthorized("invalid subscribe token")
        try:
            data = self._s.loads(token[len(TOKEN_PREFIX) :])
        except BadSignature as exc:
            raise Unauthorized("invalid subscribe token") from exc
        if not isinstance(data, dict) or float(data.get("e", 0)) < time.time():
            raise Unauthorized("subscribe token expired")
        jobs = data.get("j")
        return str(data["u"]), frozenset(jobs) if jobs is not None else None


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value and value.isascii() else None


async def authenticate(
    db: Database,
    tokens: Tokens,
    header: str | None,
    token: str | None,
    allow_token: bool,
    keys: accounts.KeyCache | None = None,
) -> Principal:
    """The caller; API keys are resolved through `keys` when given (see accounts.KeyCache)."""
    key = bearer(header)
    if key:
        if key.startswith(TOKEN_PREFIX) and allow_token:
            token = key
        else:
            user = await accounts.authenticate(db, key, keys)
            if user is None:
                raise Unauthorized("invalid API key")
            return Principal(user.id, user.name)
    if token and allow_token:
        user_id, jobs = tokens.verify(token)
        user = await accounts.get_user(db, user_id)
        if user is None:
            raise Unauthorized("invalid subscribe token")
        return Principal(user.id, user.name, jobs, subscribe_only=True)
    raise Unauthorized("missing credentials: send Authorization: Bearer <api key>")
