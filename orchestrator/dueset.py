"""The one claimer of Redis "due sets": sorted sets whose score is when a member is due (attempts
waiting for their retry backoff, fal requests waiting for their next poll). A claim takes the due
members atomically, so of several processes exactly one gets each: it either removes them
(`lease_s=0`: the claimer puts a member back itself if it fails) or pushes their score `lease_s`
ahead (a claimer that dies leaves the member to be claimed again when the lease runs out)."""

from __future__ import annotations

import time
from typing import Any

import redis
import redis.asyncio as aioredis

_CLAIM = """
local due = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local lease = tonumber(ARGV[2])
for _, member in ipairs(due) do
  if lease > 0 then
    redis.call('zadd', KEYS[1], tonumber(ARGV[1]) + lease, member)
  else
    redis.call('zrem', KEYS[1], member)
  end
end
return due
"""


def _members(raw: Any) -> list[str]:
    return [m.decode() if isinstance(m, bytes) else str(m) for m in raw or []]


def claim(client: redis.Redis, key: str, limit: int, lease_s: float = 0.0) -> list[str]:
    """Claim up to `limit` members of `key` that are due now."""
    return _members(client.eval(_CLAIM, 1, key, time.time(), lease_s, limit))


async def aclaim(client: aioredis.Redis, key: str, limit: int, lease_s: float = 0.0) -> list[str]:
    """`claim` on an asyncio client."""
    return _members(await client.eval(_CLAIM, 1, key, time.time(), lease_s, limit))
