"""Per-user rate limits shared by every API process (the `limits` package on our Redis)."""

from __future__ import annotations

import math
import time

from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from orchestrator.errors import RateLimited, Unavailable


class Limiter:
    def __init__(self, redis_url: str, submit_rate: str) -> None:
        uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
        self.storage = RedisStorage(uri, implementation="redispy", key_prefix="orch:rl")
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.submit_item = parse(submit_rate)

    async def hit_submit(self, user_id: str) -> None:
        try:
            ok = await self.limiter.hit(self.submit_item, "submit", user_id)
            if ok:
                return
            stats = await self.limiter.get_window_stats(self.submit_item, "submit", user_id)
        except Exception as exc:
            raise Unavailable(f"rate limiter unavailable: {type(exc).__name__}") from exc
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        raise RateLimited(f"too many submits: limit is {self.submit_item}", retry_after_s=retry)
