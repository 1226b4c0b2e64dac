"""The `subscribed` answer of each job, read from SQL once for many sockets.

An entry is dropped by the hub at the job's next event (it sees every event), and after
`TTL_S` at the latest (fields computed when read, or an event missed while the hub was
reconnecting). So a socket's `subscribed` job is never older than an event the hub has
delivered to it, and many sockets subscribing to one job cost one SQL read.
"""

from __future__ import annotations

import time

import orjson

from orchestrator import jobs
from orchestrator.db import Database
from orchestrator.errors import NotFound
from orchestrator.views import job_resource
from ws_gateway.flights import Flights
from ws_gateway.message import ws_text_frame

TTL_S = 2.0
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
            job = await jobs.get_job(self.db, job_id, None)
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
