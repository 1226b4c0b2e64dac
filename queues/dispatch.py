"""Puts jobs on RQ queues and stops them. RQ is synchronous: async callers use the `a*` methods,
which run it in a thread so the event loop never blocks.

The RQ job id of an attempt is `{jobId}_a{n}`: a retry is a new RQ job, so RQ's bookkeeping
for the attempt that is ending never overwrites the next one's.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from redis import Redis
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus

log = logging.getLogger(__name__)

RUNNER = "queues.runner.run_job"
RESULT_TTL_S = 3600
FAILURE_TTL_S = 7 * 24 * 3600


def rq_job_id(job_id: str, attempt: int) -> str:
    return f"{job_id}_a{attempt}"


class Dispatcher:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queues: dict[str, Queue] = {}

    def queue(self, name: str) -> Queue:
        if name not in self._queues:
            self._queues[name] = Queue(name, connection=self.redis)
        return self._queues[name]

    def enqueue(self, job_id: str, queue: str, attempt: int, timeout_s: int, delay_s: float = 0) -> None:
        kwargs = {
            "job_id": rq_job_id(job_id, attempt),
            "job_timeout": timeout_s,
            "result_ttl": RESULT_TTL_S,
            "failure_ttl": FAILURE_TTL_S,
            "description": f"orchestrator job {job_id} attempt {attempt}",
        }
        q = self.queue(queue)
        if delay_s > 0:
            q.enqueue_in(timedelta(seconds=delay_s), RUNNER, job_id, **kwargs)
        else:
            q.enqueue(RUNNER, job_id, **kwargs)

    def is_enqueued(self, job_id: str, attempt: int) -> bool:
        """True when RQ holds the attempt (queued, scheduled, deferred or running)."""
        try:
            job = RQJob.fetch(rq_job_id(job_id, attempt), connection=self.redis)
        except NoSuchJobError:
            return False
        return job.get_status() in (
            JobStatus.QUEUED,
            JobStatus.SCHEDULED,
            JobStatus.STARTED,
            JobStatus.DEFERRED,
        )

    def stop(self, job_id: str, attempt: int) -> None:
        """Stop an attempt: drop it from its queue, or kill its work horse if it runs."""
        rid = rq_job_id(job_id, attempt)
        try:
            job = RQJob.fetch(rid, connection=self.redis)
        except NoSuchJobError:
            return
        status = job.get_status()
        if status == JobStatus.STARTED:
            try:
                send_stop_job_command(self.redis, rid)
            except InvalidJobOperation:
                pass
        elif status in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
            try:
                job.cancel()
            except InvalidJobOperation:
                pass

    async def aenqueue(self, job_id: str, queue: str, attempt: int, timeout_s: int, delay_s: float = 0) -> None:
        await asyncio.to_thread(self.enqueue, job_id, queue, attempt, timeout_s, delay_s)

    async def astop(self, job_id: str, attempt: int) -> None:
        try:
            await asyncio.to_thread(self.stop, job_id, attempt)
        except Exception as exc:  # the job is already final in SQL; the task also stops on its next report
            log.warning("stopping %s failed: %s", job_id, exc)
