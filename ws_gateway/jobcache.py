"""The `subscribed` answer of each job, read from SQL once for many sockets, and the jobs
wanted at the same time read together (one `SELECT … WHERE id IN (…)` per batch, one batch at a
time): a crowd reconnecting to a thousand jobs costs a few queries, not a thousand.

An entry is dropped by the hub at the job's next event (it sees every event), and after
`TTL_S` at the latest (fields computed when read, or an event missed while the hub was
reconnecting). So a socket's `subscribed` job is never older than an event the hub has
delivered to it, and many sockets subscribing to one job cost one SQL read.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import orjson
from sqlmodel import col, select

from orchestrator.core import jobs
from orchestrator.core.views import job_resource
from orchestrator.errors import NotFound
from orchestrator.store.db import Database
from orchestrator.store.tables import Job
from ws_gateway.flights import Flights
from ws_gateway.message import ws_text_frame

TTL_S = 2.0
BATCH = 500
"""Jobs read by one query."""
MAX_ENTRIES = 50_000
"""Past this, expired entries are swept out before a new one is added."""


class JobCache:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.entries: dict[str, tuple[str, bytes, float]] = {}
        """job id → (owner's user id, the `subscribed` WebSocket frame, expiry on the monotonic clock)"""
        self.flights: Flights[str, tuple[str, bytes]] = Flights()
        self.loading: dict[str, list[int]] = {}
        """job id → [reads under way, changes seen meanwhile]: a read that saw a change is not kept."""
        self._wanted: dict[str, list[asyncio.Future[Job | None]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def subscribed_frame(self, job_id: str, user_id: str) -> bytes:
        """The frame `{"type": "subscribed", "jobId", "job"}`, or NotFound for a missing or foreign job."""
        entry = self.entries.get(job_id)
        if entry is not None and entry[2] > time.monotonic():
            owner, frame = entry[0], entry[1]
        else:
            owner, frame = await self.flights.get(job_id, lambda: self._load(job_id))
        if owner != user_id:
            raise NotFound("job not found")
        return frame

    async def _load(self, job_id: str) -> tuple[str, bytes]:
        mark = self.loading.setdefault(job_id, [0, 0])
        mark[0] += 1
        seen = mark[1]
        try:
            job = await self._read(job_id)
        finally:
            changed = mark[1] != seen
            mark[0] -= 1
            if mark[0] == 0:
                del self.loading[job_id]
        body = b'{"type":"subscribed","jobId":%s,"job":%s}' % (orjson.dumps(job_id), orjson.dumps(job_resource(job)))
        frame = ws_text_frame(body)
        if not changed:
            if len(self.entries) >= MAX_ENTRIES:
                self._sweep()
            self.entries[job_id] = (job.user_id, frame, time.monotonic() + TTL_S)
        return job.user_id, frame

    async def _read(self, job_id: str) -> Job:
        if not jobs.JOB_ID.fullmatch(job_id):
            raise NotFound("job not found")
        fut: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        self._wanted.setdefault(job_id, []).append(fut)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read_batches())
        job = await fut
        if job is None:
            raise NotFound("job not found")
        return job

    async def _read_batches(self) -> None:
        while self._wanted:
            batch = dict(itertools.islice(self._wanted.items(), BATCH))
            for job_id in batch:
                del self._wanted[job_id]
            try:
                async with self.db.read() as s:
                    rows = (await s.execute(select(Job).where(col(Job.id).in_(list(batch))))).scalars().all()
            except Exception as exc:
                for futs in batch.values():
                    for fut in futs:
                        if not fut.done():
                            fut.set_exception(exc)
                continue
            found = {job.id: job for job in rows}
            for job_id, futs in batch.items():
                for fut in futs:
                    if not fut.done():
                        fut.set_result(found.get(job_id))

    def invalidate(self, job_id: str) -> None:
        self.entries.pop(job_id, None)
        mark = self.loading.get(job_id)
        if mark is not None:
            mark[1] += 1

    def clear(self) -> None:
        self.entries.clear()
        for mark in self.loading.values():
            mark[1] += 1

    def _sweep(self) -> None:
        now = time.monotonic()
        for job_id in [j for j, e in self.entries.items() if e[2] <= now]:
            del self.entries[job_id]
        while len(self.entries) >= MAX_ENTRIES:
            del self.entries[next(iter(self.entries))]
