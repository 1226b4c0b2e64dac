"""Who may read a job's events on /ws and SSE streams, cheaply enough for a reconnecting crowd.

API keys go through orchestrator.core.auth. A subscribe token is checked there too (signature and
expiry); the user it names is then read from SQL at most once per `USER_TTL_S` for all the
sockets opened with that user's tokens, and the token's expiry is kept so that an open socket
can be closed when it passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web
from itsdangerous import URLSafeSerializer

from orchestrator.core import accounts
from orchestrator.core.auth import TOKEN_PREFIX, TOKEN_SALT, Principal, bearer
from orchestrator.core.services import Core
from orchestrator.errors import Unauthorized
from orchestrator.web import PRINCIPAL, principal
from ws_gateway.flights import Flights

USER_TTL_S = 5.0
"""How long a token's user is trusted without reading it again (a deleted user's tokens stop within it)."""


@dataclass(frozen=True, slots=True)
class Reader:
    principal: Principal
    expires_at: float | None
    """Unix time a subscribe token expires; None for an API key."""


class Access:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._claims = URLSafeSerializer(core.settings.signing_key, salt=TOKEN_SALT)
        self._names: dict[str, tuple[str | None, float]] = {}
        self._flights: Flights[str, str | None] = Flights()

    async def reader(self, request: web.Request) -> Reader:
        """The caller, or Unauthorized (401 before any upgrade)."""
        key = bearer(request.headers.get("Authorization"))
        token = key if key and key.startswith(TOKEN_PREFIX) else None if key else request.query.get("token")
        if not token:
            return Reader(await principal(request, allow_token=True), None)
        user_id, job_ids = self.core.tokens.verify(token)  # forged or expired: Unauthorized
        expires_at = float(self._claims.loads(token[len(TOKEN_PREFIX) :])["e"])
        name = await self._name(user_id)
        if name is None:
            raise Unauthorized("invalid subscribe token")
        p = Principal(user_id, name, job_ids, subscribe_only=True)
        request[PRINCIPAL] = p
        return Reader(p, expires_at)

    async def _name(self, user_id: str) -> str | None:
        cached = self._names.get(user_id)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        name = await self._flights.get(user_id, lambda: self._read_name(user_id))
        if len(self._names) > 10_000:
            self._names = {u: v for u, v in self._names.items() if v[1] > now}
        self._names[user_id] = (name, now + USER_TTL_S)
        return name

    async def _read_name(self, user_id: str) -> str | None:
        user = await accounts.get_user(self.core.db, user_id)
        return None if user is None else user.name


ACCESS = web.AppKey("access", Access)
