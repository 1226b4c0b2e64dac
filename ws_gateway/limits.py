"""Open sockets and streams per user, capped across API processes.

Each process publishes its own counts under its own Redis hash (`orch:slots:{process}`), kept
alive by a heartbeat and expiring `ttl_s` after the last one. A user's count is the sum over
live processes (those that beat within `ttl_s`), so when a process dies, even by `kill -9`,
its share disappears within `ttl_s`. The counts in the process's memory are the truth; Redis
holds a copy, rewritten whole at each heartbeat when nothing is under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict

import redis.asyncio as aioredis

from orchestrator import keys
from orchestrator.errors import RateLimited

log = logging.getLogger(__name__)

ACQUIRE = """
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[4]))
local total = 0
for _, p in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  total = total + tonumber(redis.call('HGET', ARGV[6] .. p, ARGV[1]) or '0')
end
if total >= tonumber(ARGV[2]) then return -1 end
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return total + 1
"""
"""KEYS: the live-process set, this process's hash; ARGV: user, cap, now, ttl_s, process, hash prefix."""


class SocketSlots:
    def __init__(self, redis: aioredis.Redis, max_per_user: int, ttl_s: float = 30.0) -> None:
        self.redis = redis
        self.max = max_per_user
        self.ttl_s = max(1, round(ttl_s))
        self.process = uuid.uuid4().hex
        self.key = keys.slots(self.process)
        self.counts: dict[str, int] = defaultdict(int)
        self.busy = 0
        """Redis updates under way: the heartbeat rewrites the copy only when there are none."""
        self._acquire = redis.register_script(ACQUIRE)

    async def acquire(self, user_id: str) -> None:
        """Take a slot, or RateLimited when the user has `max` open across the cluster."""
        self.busy += 1
        try:
            total = await self._acquire(
                keys=[keys.SLOT_PROCESSES, self.key],
                args=[user_id, self.max, time.time(), self.ttl_s, self.process, keys.slots("")],
            )
        except Exception:
            total = 0  # Redis down: the socket still works for what the database can answer
        finally:
            self.busy -= 1
        if int(total) < 0:
            raise RateLimited(f"at most {self.max} open sockets and streams per user", retry_after_s=5)
        self.counts[user_id] += 1

    async def release(self, user_id: str) -> None:
        left = self.counts[user_id] - 1
        if left > 0:
            self.counts[user_id] = left
        else:
            self.counts.pop(user_id, None)
        self.busy += 1
        try:
            if left > 0:
                await self.redis.hincrby(self.key, user_id, -1)
            else:
                await self.redis.hdel(self.key, user_id)
        except Exception:
            pass  # the next heartbeat writes the right count
        finally:
            self.busy -= 1

    async def beat(self) -> None:
        """Refresh this process's share (and rewrite it from memory when nothing is under way)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            if self.busy == 0:
                pipe.delete(self.key)
                for user_id, n in self.counts.items():
                    pipe.hset(self.key, user_id, n)
            pipe.expire(self.key, self.ttl_s)
            pipe.zadd(keys.SLOT_PROCESSES, {self.process: time.time()})
            await pipe.execute()

    async def heartbeat(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception as exc:
                log.info("socket slot heartbeat failed: %s", exc)
            await asyncio.sleep(self.ttl_s / 3)

    async def forget(self) -> None:
        """On a clean shutdown: this process holds nothing any more."""
        with contextlib.suppress(Exception):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.key)
                pipe.zrem(keys.SLOT_PROCESSES, self.process)
                await pipe.execute()
