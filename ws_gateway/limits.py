"""Open sockets and streams per user, capped across API processes.

Each process publishes its own counts under its own Redis hash (`orch:slots:{process}`), kept
alive by a heartbeat and expiring `ttl_s` after the last one. A user's count is the sum over
live processes (those that beat within `ttl_s`), so when a process dies, even by `kill -9`,
its share disappears within `ttl_s`. The counts in the process's memory are the truth; Redis
holds a copy, rewritten whole at each heartbeat when no update is under way.

Cheap under a crowd: the slots asked for in one turn of the event loop are taken by one script
call, and the slots given back are returned by one pipeline; a slot given back counts until
then, so the cap errs on the side of refusing.
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
from orchestrator.loops import every

log = logging.getLogger(__name__)

BATCH = 500
"""Slots asked for by one script call."""

ACQUIRE = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
local procs = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for i = 6, #ARGV do
  local user = ARGV[i]
  local total = 0
  for _, p in ipairs(procs) do
    total = total + tonumber(redis.call('HGET', ARGV[5] .. p, user) or '0')
  end
  if total >= tonumber(ARGV[1]) then
    out[#out + 1] = -1
  else
    redis.call('HINCRBY', KEYS[2], user, 1)
    out[#out + 1] = total + 1
  end
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
return out
"""
"""KEYS: the live-process set, this process's hash; ARGV: cap, now, ttl_s, process, hash prefix,
then one user id per slot asked for. Answers the user's new count per slot, or -1 when refused."""


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
        self._script = redis.register_script(ACQUIRE)
        self._asks: list[tuple[str, asyncio.Future[bool]]] = []
        self._asking: asyncio.Future[None] | None = None
        self._given_back: dict[str, int] = defaultdict(int)
        self._giving_back: asyncio.Future[None] | None = None

    async def acquire(self, user_id: str) -> None:
        """Take a slot, or RateLimited when the user has `max` open across the cluster."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._asks.append((user_id, fut))
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._ask())
        if not await fut:
            raise RateLimited(f"at most {self.max} open sockets and streams per user", retry_after_s=5)

    async def _ask(self) -> None:
        try:
            while self._asks:
                batch, self._asks = self._asks[:BATCH], self._asks[BATCH:]
                self.busy += 1
                try:
                    args: list[str | int | float] = [self.max, time.time(), self.ttl_s, self.process]
                    args += [keys.slots("")] + [user_id for user_id, _ in batch]
                    totals = await self._script(keys=[keys.SLOT_PROCESSES, self.key], args=args)
                except Exception:
                    totals = [0] * len(batch)  # Redis down: sockets still work for what the database can answer
                finally:
                    self.busy -= 1
                for (user_id, fut), total in zip(batch, totals, strict=True):
                    granted = int(total) >= 0
                    if granted:
                        self.counts[user_id] += 1
                    if fut.done():  # the asker went away meanwhile
                        if granted:
                            self.release(user_id)
                    else:
                        fut.set_result(granted)
        finally:
            self._asking = None

    def release(self, user_id: str) -> None:
        left = self.counts[user_id] - 1
        if left > 0:
            self.counts[user_id] = left
        else:
            self.counts.pop(user_id, None)
        self._given_back[user_id] += 1
        if self._giving_back is None:
            self._giving_back = asyncio.ensure_future(self._give_back())

    async def _give_back(self) -> None:
        try:
            while self._given_back:
                batch, self._given_back = self._given_back, defaultdict(int)
                self.busy += 1
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for user_id, n in batch.items():
                            pipe.hincrby(self.key, user_id, -n)
                        await pipe.execute()
                except Exception:
                    pass  # the next heartbeat writes the right counts
                finally:
                    self.busy -= 1
        finally:
            self._giving_back = None

    async def beat(self) -> None:
        """Refresh this process's share (and rewrite it from memory when nothing is under way)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            if self.busy == 0 and not self._asks and not self._given_back:
                pipe.delete(self.key)
                for user_id, n in self.counts.items():
                    pipe.hset(self.key, user_id, n)
            pipe.expire(self.key, self.ttl_s)
            pipe.zadd(keys.SLOT_PROCESSES, {self.process: time.time()})
            await pipe.execute()

    async def heartbeat(self) -> None:
        await every(
            "socket slot heartbeat", self.ttl_s / 3, self.beat, max_backoff_s=self.ttl_s / 3, level=logging.INFO
        )

    async def forget(self) -> None:
        """On a clean shutdown: this process holds nothing any more."""
        with contextlib.suppress(Exception):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.key)
                pipe.zrem(keys.SLOT_PROCESSES, self.process)
                await pipe.execute()
