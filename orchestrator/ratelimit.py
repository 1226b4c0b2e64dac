"""Per-user rate limits shared by every API process, on our Redis.

A sliding-window counter: the count of this fixed window plus the previous window's count
weighted by how much of it still overlaps the sliding window (Cloudflare's approximation of a
moving window). One small script (INCR, EXPIRE, GET; a refused request gives its increment back,
so refusals do not use up the quota): one round trip and one reply per submit. It runs before
the submit's SQL transaction so a limited client is refused before anything is charged.
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis
from limits import parse

from orchestrator import keys
from orchestrator.errors import RateLimited, Unavailable

HIT_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
local before = tonumber(redis.call('GET', KEYS[2]) or '0')
if count + before * tonumber(ARGV[2]) > tonumber(ARGV[3]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return 1
"""
"""KEYS: this window's counter, the previous one's. ARGV: expiry (s), the previous window's
weight, the limit. 1 when the request is allowed."""


class Limiter:
    def __init__(self, redis: aioredis.Redis, submit_rate: str) -> None:
        self.redis = redis
        self._hit = redis.register_script(HIT_SCRIPT)
        item = parse(submit_rate)
        self.submit_rate = str(item)
        self.limit = item.amount
        self.window_s = item.get_expiry()

    async def hit_submit(self, user_id: str) -> None:
        now = time.time()
        window = int(now // self.window_s)
        weight = 1 - (now - window * self.window_s) / self.window_s
        try:
            allowed = await self._hit(
                keys=[keys.rate_window("submit", user_id, window), keys.rate_window("submit", user_id, window - 1)],
                args=[self.window_s * 2, weight, self.limit],
            )
        except Exception as exc:
            raise Unavailable(f"rate limiter unavailable: {type(exc).__name__}") from exc
        if allowed:
            return
        retry = max(1, math.ceil((window + 1) * self.window_s - now))
        raise RateLimited(f"too many submits: limit is {self.submit_rate}", retry_after_s=retry)
