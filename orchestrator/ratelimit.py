"""Per-user rate limits shared by every API process (the `limits` package on our Redis)."""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from orchestrator.errors import RateLimited, Unavailable


class Limiter:
    def __init__(self, redis_url: str, submit_rate: str, redeliver_rate: str = "30/minute") -> None:
        uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
        self.storage = RedisStorage(uri, implementation="redispy", key_prefix="orch:rl")
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.submit_item = parse(submit_rate)
        self.redeliver_item = parse(redeliver_rate)

    async def hit_submit(self, user_id: str) -> None:
        await self._hit(self.submit_item, "submit", user_id, "submits")

    async def hit_redeliver(self, user_id: str) -> None:
        """Each redelivery makes an outbound request now: limited per user like submits."""
        await self._hit(self.redeliver_item, "redeliver", user_id, "redeliveries")

    async def _hit(self, item: RateLimitItem, name: str, user_id: str, what: str) -> None:
        """Count one hit; RateLimited (429, Retry-After) past the limit, Unavailable if Redis is."""
        try:
            ok = await self.limiter.hit(item, name, user_id)
            if ok:
                return
            stats = await self.limiter.get_window_stats(item, name, user_id)
        except Exception as exc:
            raise Unavailable(f"rate limiter unavailable: {type(exc).__name__}") from exc
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        raise RateLimited(f"too many {what}: limit is {item}", retry_after_s=retry)
