"""One client's view of one job: delivers events in `seq` order, no gaps, no duplicates.

Delivery guarantee: after `start(since)`, the sink receives every event with seq > since
exactly once, in order, whether it comes from the replay, the live channel or a gap fill;
live events that arrive while the replay is read are held and merged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ws_gateway.message import Message

Sink = Callable[[Message], None]
"""Writes one event to the client; must not block."""
Fetch = Callable[[str, int, int], Awaitable[list[Message]]]
"""Fetch(job_id, after_seq, upto_seq) → stored events in (after, upto], from the log or SQL."""


class Subscription:
    __slots__ = ("_filling", "fetch", "finished", "job_id", "last_seq", "pending", "ready", "sink")

    def __init__(self, job_id: str, since: int, sink: Sink, fetch: Fetch) -> None:
        self.job_id = job_id
        self.last_seq = since
        self.sink = sink
        self.fetch = fetch
        self.ready = False
        self.finished = False
        self.pending: dict[int, Message] | None = None  # held out of order; None while empty
        self._filling: asyncio.Task[None] | None = None

    def offer(self, msg: Message) -> None:
        if self.finished or msg.seq <= self.last_seq:
            return
        if self.ready and msg.seq == self.last_seq + 1 and not self.pending:
            self._send(msg)  # the common case: the next event, nothing held
            return
        self._hold(msg)
        if self.ready:
            self._drain()
            if self.pending and not self.finished:
                self.request_fill()

    def _hold(self, msg: Message) -> None:
        if self.pending is None:
            self.pending = {}
        self.pending.setdefault(msg.seq, msg)

    def _send(self, msg: Message) -> None:
        self.last_seq = msg.seq
        self.sink(msg)
        if msg.final:
            self.finished = True
            self.pending = None

    def _drain(self) -> None:
        while self.pending and not self.finished:
            msg = self.pending.pop(self.last_seq + 1, None)
            if msg is None:
                return
            self._send(msg)
        if not self.pending:
            self.pending = None

    def request_fill(self) -> None:
        """Ask for the events between what was sent and what is held (or anything newer)."""
        if self._filling is None or self._filling.done():
            self._filling = asyncio.ensure_future(self._fill())

    async def _fill(self) -> None:
        for _ in range(5):
            if self.finished:
                return
            upto = min(self.pending) - 1 if self.pending else 0
            for msg in await self.fetch(self.job_id, self.last_seq, upto):
                if msg.seq > self.last_seq:
                    self._hold(msg)
            before = self.last_seq
            self._drain()
            if not self.pending:
                return
            if self.last_seq == before:
                await asyncio.sleep(0.05)  # an event being committed right now; look again

    async def start(self, replay: list[Message]) -> None:
        """Send the replay (events after `since`), then whatever arrived live meanwhile."""
        for msg in replay:
            if msg.seq > self.last_seq:
                self._hold(msg)
        self.ready = True
        self._drain()
        if self.pending and not self.finished:
            self.request_fill()

    def cancel(self) -> None:
        self.finished = True
        if self._filling is not None:
            self._filling.cancel()
