"""Per-user rate limits shared by every API process, on our Redis.

A sliding-window counter: the count of this fixed window plus the previous window's count
weighted by how much of it still overlaps the sliding window (Cloudflare's approximation of a
moving window). One pipeline (INCR, EXPIRE, GET), one round trip and no script per submit; a
refused request gives its increment back, so refusals do not use up the quota. It runs before
the submit's SQL transaction so a limited client is refused before anything is charged.
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis
from limits import parse

from orchestrator import keys
from orchestrator.errors import RateLimited, Unavailable


class Limiter:
    def __init__(self, redis: aioredis.Redis, submit_rate: str) -> None:
        self.redis = redis
        item = parse(submit_rate)
        self.submit_rate = str(item)
        self.limit = item.amount
        self.window_s = item.get_expiry()

    async def hit_submit(self, user_id: str) -> None:
        now = time.time()
        window = int(now // self.window_s)
        key = keys.rate_window("submit", user_id, window)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, self.window_s * 2)
                pipe.get(keys.rate_window("submit", user_id, window - 1))
                count, _, before = await pipe.execute()
            into = (now - window * self.window_s) / self.window_s
            if int(count) + int(before or 0) * (1 - into) <= self.limit:
                return
            await self.redis.decr(key)
        except Exception as exc:
            raise Unavailable(f"rate limiter unavailable: {type(exc).__name__}") from exc
        retry = max(1, math.ceil((window + 1) * self.window_s - now))
        raise RateLimited(f"too many submits: limit is {self.submit_rate}", retry_after_s=retry)
