"""Open sockets per user, counted in Redis so the limit holds across API processes."""

from __future__ import annotations

import redis.asyncio as aioredis

from orchestrator.errors import RateLimited

SLOT_TTL_S = 3600


class SocketSlots:
    def __init__(self, redis: aioredis.Redis, max_per_user: int) -> None:
        self.redis = redis
        self.max = max_per_user

    def _key(self, user_id: str) -> str:
        return f"orch:sockets:{user_id}"

    async def acquire(self, user_id: str) -> None:
        key = self._key(user_id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, SLOT_TTL_S)
                count, _ = await pipe.execute()
        except Exception:
            return  # Redis down: the socket still works for what the database can answer
        if int(count) > self.max:
            await self.release(user_id)
            raise RateLimited(f"at most {self.max} open sockets per user", retry_after_s=5)

    async def release(self, user_id: str) -> None:
        try:
            await self.redis.decr(self._key(user_id))
        except Exception:
            pass
