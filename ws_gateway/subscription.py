"""One client's view of one job: delivers events in `seq` order, no gaps, no duplicates.

Delivery guarantee: after `start(since)`, the sink receives every event with seq > since
exactly once, in order, whether it comes from the replay, the live channel or a gap fill;
live events that arrive while the replay is read are held and merged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

FINAL = frozenset({"completed", "failed", "cancelled", "timed_out"})

Sink = Callable[[dict[str, Any], bytes], None]
"""Writes one event (dict and its JSON bytes) to the client; must not block."""
Fetch = Callable[[str, int, int], Awaitable[list[dict[str, Any]]]]
"""Fetch(job_id, after_seq, upto_seq) → stored events in (after, upto], from the log or SQL."""


class Subscription:
    def __init__(self, job_id: str, since: int, sink: Sink, fetch: Fetch) -> None:
        self.job_id = job_id
        self.last_seq = since
        self.sink = sink
        self.fetch = fetch
        self.ready = False
        self.finished = False
        self.pending: dict[int, tuple[dict[str, Any], bytes]] = {}
        self._filling: asyncio.Task[None] | None = None

    def offer(self, event: dict[str, Any], raw: bytes) -> None:
        seq = int(event["seq"])
        if seq <= self.last_seq or self.finished:
            return
        self.pending[seq] = (event, raw)
        if self.ready:
            self._drain()

    def _drain(self) -> None:
        while self.last_seq + 1 in self.pending and not self.finished:
            event, raw = self.pending.pop(self.last_seq + 1)
            self.last_seq += 1
            self.sink(event, raw)
            if event.get("type") == "status" and event.get("status") in FINAL:
                self.finished = True
                self.pending.clear()
        if self.pending and not self.finished:
            self.request_fill()

    def request_fill(self) -> None:
        """Ask for the events between what was sent and what is held (or anything newer)."""
        if self._filling is None or self._filling.done():
            self._filling = asyncio.ensure_future(self._fill())

    async def _fill(self) -> None:
        for _ in range(5):
            if self.finished:
                return
            upto = min(self.pending) - 1 if self.pending else 0
            events = await self.fetch(self.job_id, self.last_seq, upto)
            for ev in events:
                seq = int(ev["seq"])
                if seq > self.last_seq and seq not in self.pending:
                    self.pending[seq] = (ev, b"")
            before = self.last_seq
            self._drain_only()
            if not self.pending or self.last_seq == before:
                if not self.pending:
                    return
                await asyncio.sleep(0.05)  # an event being committed right now; look again

    def _drain_only(self) -> None:
        while self.last_seq + 1 in self.pending and not self.finished:
            event, raw = self.pending.pop(self.last_seq + 1)
            self.last_seq += 1
            self.sink(event, raw)
            if event.get("type") == "status" and event.get("status") in FINAL:
                self.finished = True
                self.pending.clear()

    async def start(self, replay: list[dict[str, Any]]) -> None:
        """Send the replay (events after `since`), then whatever arrived live meanwhile."""
        for ev in replay:
            seq = int(ev["seq"])
            if seq > self.last_seq and seq not in self.pending:
                self.pending[seq] = (ev, b"")
        self.ready = True
        self._drain()

    def cancel(self) -> None:
        self.finished = True
        if self._filling is not None:
            self._filling.cancel()
