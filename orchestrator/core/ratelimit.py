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
    def __init__(self, redis: aioredis.Redis, submit_rate: str, redeliver_rate: str = "30/minute") -> None:
        self.redis = redis
        self._script = redis.register_script(HIT_SCRIPT)
        self.submit = _Rate(submit_rate)
        self.redeliver = _Rate(redeliver_rate)

    async def hit_submit(self, user_id: str) -> None:
        await self._hit(self.submit, "submit", user_id, "submits")

    async def hit_redeliver(self, user_id: str) -> None:
        """Each redelivery makes an outbound request now: limited per user like submits."""
        await self._hit(self.redeliver, "redeliver", user_id, "redeliveries")

    async def _hit(self, rate: _Rate, name: str, user_id: str, what: str) -> None:
        """Count one hit; RateLimited (429, Retry-After) past the limit, Unavailable if Redis is."""
        now = time.time()
        window = int(now // rate.window_s)
        weight = 1 - (now - window * rate.window_s) / rate.window_s
        try:
            allowed = await self._script(
                keys=[keys.rate_window(name, user_id, window), keys.rate_window(name, user_id, window - 1)],
                args=[rate.window_s * 2, weight, rate.limit],
            )
        except Exception as exc:
            raise Unavailable(f"rate limiter unavailable: {type(exc).__name__}") from exc
        if allowed:
            return
        retry = max(1, math.ceil((window + 1) * rate.window_s - now))
        raise RateLimited(f"too many {what}: limit is {rate.text}", retry_after_s=retry)


class _Rate:
    """A limit parsed from `N/period` (limits' notation): N hits per window of the period."""

    def __init__(self, text: str) -> None:
        item = parse(text)
        self.text = str(item)
        self.limit = item.amount
        self.window_s = item.get_expiry()
