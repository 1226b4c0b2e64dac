"""The event transport: stored events go to a per-job log in Redis and to one pub/sub channel.

The log is a sorted set scored by `seq`, so writing an event twice (a retried publish) is
harmless and replays come back in order whatever order concurrent writers published in.
SQL stays the truth: when Redis misses an event the gateway reads it from SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis import Redis as SyncRedis

from metrics.jobs import record_transition
from orchestrator import keys
from orchestrator.states import FINAL

log = logging.getLogger(__name__)

LOG_MAX_EVENTS = 5000
"""Events kept per job in Redis; older ones are read from SQL."""
LOG_TRIM_EVERY = 64
"""A job's log is trimmed and its expiry renewed on its first event, every this many events and
on its final one (so it holds at most LOG_MAX_EVENTS + LOG_TRIM_EVERY): two commands fewer for
most progress events."""


class Transition:
    """A job's change of status, for the metrics recorded beside the event."""

    def __init__(
        self,
        queue: str,
        task_type: str,
        status: str,
        wait_s: float | None = None,
        duration_s: float | None = None,
    ) -> None:
        self.queue, self.task_type, self.status = queue, task_type, status
        self.wait_s, self.duration_s = wait_s, duration_s


BATCH_SCRIPT = """
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""
"""Runs a batch of commands given as ARGV = count, command, args..., count, command, ... (a
single Redis server: the keys are not declared, so not for Redis Cluster)."""


class EventBus:
    def __init__(self, redis: aioredis.Redis, retention_s: float) -> None:
        self.redis = redis
        self.retention_s = int(retention_s)
        self._recorder = SyncRedis()  # never connects: its pipelines only record commands
        self._batch = redis.register_script(BATCH_SCRIPT)

    async def publish(self, event: dict[str, Any], transition: Transition | None = None) -> None:
        """Announce a stored event. Failures are logged, never raised: the event is safe in SQL."""
        if not await self.send([lambda pipe: self.add_event(pipe, event, transition)]):
            log.warning("publish of %s/%s failed", event["jobId"], event["seq"])

    def add_event(self, pipe: Any, event: dict[str, Any], transition: Transition | None = None) -> None:
        """Queue a stored event's writes on `pipe`: its job's log, the channel, the metrics."""
        payload = orjson.dumps(event)
        log_key = keys.event_log(event["jobId"])
        seq = event["seq"]
        pipe.zadd(log_key, {payload: seq})
        if seq == 1 or seq % LOG_TRIM_EVERY == 0 or event["status"] in FINAL:
            pipe.zremrangebyrank(log_key, 0, -LOG_MAX_EVENTS - 1)
            pipe.expire(log_key, self.retention_s)
        pipe.publish(keys.EVENTS_CHANNEL, payload)
        if transition is not None:
            record_transition(
                pipe,
                transition.queue,
                transition.task_type,
                transition.status,
                transition.wait_s,
                transition.duration_s,
            )

    async def send(self, writes: list[Callable[[Any], None]]) -> bool:
        """Run `writes` (each adds commands to a pipeline) in one Redis round trip. False when
        Redis failed (logged, never raised: what they announce is safe in SQL).

        The commands travel as one call of `BATCH_SCRIPT` (EVALSHA): one reply to parse instead
        of one per command, which was most of a pipeline's client CPU. Like a pipeline without
        MULTI, a failing command leaves the ones before it applied."""
        recorder = self._recorder.pipeline(transaction=False)
        for write in writes:
            write(recorder)
        argv: list[Any] = []
        for args, _options in recorder.command_stack:
            argv.append(len(args))
            argv.extend(args)
        recorder.reset()
        try:
            await self._batch(args=argv)
            return True
        except Exception as exc:  # Redis down: subscribers catch up from SQL by seq
            log.warning("Redis batch of %d writes failed: %s", len(writes), exc)
            return False

    async def replay(self, job_id: str, after_seq: int) -> list[bytes]:
        """Events (JSON) with seq > after_seq from the Redis log (may be incomplete; caller checks seqs)."""
        raw = await self.redis.zrangebyscore(keys.event_log(job_id), f"({after_seq}", "+inf")
        return [r for r in raw if isinstance(r, bytes)]
