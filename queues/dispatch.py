"""Puts jobs on RQ queues and stops them.

An enqueue is written by RQ's own `Queue.enqueue_call` into a redis-py pipeline that is never
executed: its recorded commands (the job hash, the queue push, RQ's bookkeeping) are then sent
as they are, by `enqueue` on the synchronous client or by `add_enqueue` into any `redis.asyncio`
pipeline (the submit's, beside its event), so RQ workers read exactly what RQ would have written,
with no thread and no extra round trip. `astop` still runs RQ in a thread.

Delayed attempts (retry backoff) wait in a Redis sorted set scored by due time; the API
processes' promoter moves them into RQ when due. This does not depend on RQ's scheduler, whose
lock can sit with a worker that died.

The RQ job id of an attempt is `{jobId}_a{n}`: a retry is a new RQ job, so RQ's bookkeeping
for the attempt that is ending never overwrites the next one's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis import Redis
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus

from orchestrator import dueset, keys

log = logging.getLogger(__name__)

RUNNER = "queues.runner.run_job"
RESULT_TTL_S = 3600
STOP_FLAG_TTL_S = 3600
"""How long a stop flag outlives the stop: longer than a worker takes to notice (well under 1 s)."""
FAILURE_TTL_S = 7 * 24 * 3600


def rq_job_id(job_id: str, attempt: int) -> str:
    return f"{job_id}_a{attempt}"


Command = tuple[tuple[Any, ...], dict[str, Any]]


class Dispatcher:
    def __init__(self, redis: Redis, aredis: aioredis.Redis | None = None) -> None:
        self.redis = redis
        self.aredis = aredis
        self._queues: dict[str, Queue] = {}

    def queue(self, name: str) -> Queue:
        if name not in self._queues:
            self._queues[name] = Queue(name, connection=self.redis)
        return self._queues[name]

    def enqueue_commands(
        self, job_id: str, queue: str, attempt: int, timeout_s: int, delay_s: float = 0
    ) -> list[Command]:
        """The Redis commands that enqueue an attempt (a delayed one waits in `keys.DELAYED`)."""
        if delay_s > 0:
            member = f"{job_id}|{queue}|{attempt}|{timeout_s}"
            return [(("ZADD", keys.DELAYED, time.time() + delay_s, member), {})]
        recorder = self.redis.pipeline(transaction=False)
        self.queue(queue).enqueue_call(
            RUNNER,
            args=(job_id,),
            job_id=rq_job_id(job_id, attempt),
            timeout=timeout_s,
            result_ttl=RESULT_TTL_S,
            failure_ttl=FAILURE_TTL_S,
            description=f"orchestrator job {job_id} attempt {attempt}",
            pipeline=recorder,
        )
        commands: list[Command] = list(recorder.command_stack)
        recorder.reset()
        return commands

    def add_enqueue(self, pipe: Any, job_id: str, queue: str, attempt: int, timeout_s: int, delay_s: float = 0) -> None:
        """Queue the enqueue of an attempt on `pipe` (a redis.asyncio pipeline)."""
        for args, options in self.enqueue_commands(job_id, queue, attempt, timeout_s, delay_s):
            pipe.execute_command(*args, **options)

    async def prepare(self, aredis: aioredis.Redis, queues: list[str]) -> None:
        """Learn the server version RQ records with each job once, so no enqueue asks for it."""
        version = str((await aredis.info("server"))["redis_version"])
        parts = tuple(int(p) for p in [*version.split("."), "0", "0"][:3])
        for name in queues:
            self.queue(name).redis_server_version = parts  # type: ignore[assignment]

    def prepared(self, queue: str) -> bool:
        return self.queue(queue).redis_server_version is not None

    def enqueue(self, job_id: str, queue: str, attempt: int, timeout_s: int, delay_s: float = 0) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for args, options in self.enqueue_commands(job_id, queue, attempt, timeout_s, delay_s):
            pipe.execute_command(*args, **options)
        pipe.execute()

    def promote_due(self, limit: int = 100) -> list[str]:
        """Enqueue delayed attempts that are due; returns their job ids."""
        out = []
        for member in dueset.claim(self.redis, keys.DELAYED, limit):
            job_id, queue, attempt, timeout_s = member.rsplit("|", 3)
            try:
                self.enqueue(job_id, queue, int(attempt), int(timeout_s))
            except Exception:
                self.redis.zadd(keys.DELAYED, {member: time.time() + 1})
                raise
            out.append(job_id)
        return out

    def _delayed(self, job_id: str) -> list[str]:
        """The job's delayed attempts (the set is small: only attempts in backoff)."""
        members = (m.decode() if isinstance(m, bytes) else str(m) for m in self.redis.zrange(keys.DELAYED, 0, -1))
        return [m for m in members if m.split("|", 1)[0] == job_id]

    def is_enqueued(self, job_id: str, attempt: int) -> bool:
        """True when the attempt waits (delayed, queued) or a live worker is running it."""
        if any(int(m.rsplit("|", 3)[2]) == attempt for m in self._delayed(job_id)):
            return True
        rq_id = rq_job_id(job_id, attempt)
        try:
            job = RQJob.fetch(rq_id, connection=self.redis)
        except NoSuchJobError:
            return False
        status = job.get_status()
        if status == JobStatus.QUEUED:
            # really on its queue: a worker killed between taking a job off the queue and
            # starting it leaves the job "queued" in RQ's books but on no queue
            return self.redis.lpos(self.queue(job.origin).key, rq_id) is not None
        if status in (JobStatus.SCHEDULED, JobStatus.DEFERRED):
            return True
        return status == JobStatus.STARTED and self.worker_running(job.worker_name, rq_id)

    def attempt_state(self, job_id: str, attempt: int) -> tuple[JobStatus | None, str | None]:
        """RQ's status of the attempt and the worker that took it (None, None when RQ lacks it)."""
        try:
            job = RQJob.fetch(rq_job_id(job_id, attempt), connection=self.redis)
        except NoSuchJobError:
            return None, None
        return job.get_status(), job.worker_name

    def worker_running(self, worker_name: str | None, rq_id: str) -> bool:
        """Whether that worker is alive and says it runs `rq_id` (see queues.worker)."""
        if not worker_name:
            return False
        value = self.redis.get(keys.worker_heartbeat(worker_name))
        return value is not None and (value.decode() if isinstance(value, bytes) else str(value)) == rq_id

    def stop(self, job_id: str, attempt: int) -> None:
        """Stop an attempt: flag it, and drop it from its queue if it waits. A worker running it
        (queues.watch) interrupts the task within a poll (0.1 s), and its supervisor's watchdog
        kills the process if the task ignores that past its grace period (queues.supervisor).
        RQ's stop-job command is not used: a SimpleWorker has no horse to kill."""
        self.redis.set(keys.cancel_flag(job_id), attempt, ex=STOP_FLAG_TTL_S)
        for member in self._delayed(job_id):
            self.redis.zrem(keys.DELAYED, member)
        rid = rq_job_id(job_id, attempt)
        try:
            job = RQJob.fetch(rid, connection=self.redis)
        except NoSuchJobError:
            return
        status = job.get_status()
        if status in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
            try:
                job.cancel()
            except InvalidJobOperation:
                pass

    async def aenqueue(self, job_id: str, queue: str, attempt: int, timeout_s: int, delay_s: float = 0) -> None:
        if self.aredis is None:
            await asyncio.to_thread(self.enqueue, job_id, queue, attempt, timeout_s, delay_s)
            return
        if not self.prepared(queue):
            await self.prepare(self.aredis, [queue])
        async with self.aredis.pipeline(transaction=False) as pipe:
            self.add_enqueue(pipe, job_id, queue, attempt, timeout_s, delay_s)
            await pipe.execute()

    async def astop(self, job_id: str, attempt: int) -> None:
        try:
            await asyncio.to_thread(self.stop, job_id, attempt)
        except Exception as exc:  # the job is already final in SQL; the task also stops on its next report
            log.warning("stopping %s failed: %s", job_id, exc)
