"""Per-process fan-out: one Redis subscription, a map of job → local subscriptions.

Broker (Redis pub/sub + the per-job log) → Hub (who listens to what) → Transport (a socket or
a stream that only writes and closes). See ws_gateway.subscription for the ordering guarantee.
Each event is decoded once per process (ws_gateway.message), whatever the number of sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator

from aiohttp import web

from metrics.realtime import WS_TALLY
from orchestrator import keys
from orchestrator.core import jobs
from orchestrator.core.services import Core
from ws_gateway.flights import Flights
from ws_gateway.jobcache import JobCache
from ws_gateway.message import Message
from ws_gateway.subscription import Sink, Subscription

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.subs: dict[str, set[Subscription]] = defaultdict(set)
        self.waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = defaultdict(list)
        self.jobs = JobCache(core.db)
        self._fetches: Flights[tuple[str, int, int], list[Message]] = Flights()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    # ---- the one subscription --------------------------------------------------------------

    async def run(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.core.aredis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.EVENTS_CHANNEL)
                if self.connected.is_set() is False:
                    self.connected.set()
                self.jobs.clear()  # events may have been missed: read jobs afresh
                self._catch_up_all()  # whatever was published while we were not listening
                backoff = 0.1
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is not None and msg["type"] == "message":
                        self.dispatch(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event subscription lost (%s); reconnecting", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def dispatch(self, raw: bytes) -> None:
        try:
            msg = Message.parse(raw)
            job_id = msg.event["jobId"]
        except Exception:
            log.warning("dropping malformed event")
            return
        self.jobs.invalidate(job_id)
        subs = self.subs.get(job_id)
        if subs:
            for sub in tuple(subs):
                sub.offer(msg)
            WS_TALLY.flush(msg.stored_at)
        waiters = self.waiters.get(job_id)
        if waiters:
            for after, fut in waiters:
                if msg.seq > after and not fut.done():
                    fut.set_result(None)

    def _catch_up_all(self) -> None:
        for subs in self.subs.values():
            for sub in subs:
                if sub.ready and not sub.finished:
                    sub.request_fill()

    # ---- subscriptions ---------------------------------------------------------------------

    async def fetch(self, job_id: str, after: int, upto: int = 0) -> list[Message]:
        """Stored events with seq > after (and ≤ upto when given), read after this call began;
        concurrent callers asking the same share one read and its decoded messages."""
        return await self._fetches.get((job_id, after, upto), lambda: self._read(job_id, after, upto))

    async def _read(self, job_id: str, after: int, upto: int) -> list[Message]:
        """The Redis log first (from `after` itself, which proves it complete), SQL if it has gaps."""
        events: list[Message] = []
        complete = False
        try:
            logged = await self.core.bus.replay(job_id, max(0, after - 1))
            events = [Message.parse(raw) for raw in logged]
            expected = after if after > 0 else 1
            complete = bool(events) and all(m.seq == expected + i for i, m in enumerate(events))
            events = [m for m in events if m.seq > after]
        except Exception as exc:
            log.info("event log unavailable (%s); reading SQL", exc)
        if not complete or (upto and (not events or events[-1].seq < upto)):
            events = [Message(ev) for ev in await jobs.events_after(self.core.db, job_id, after)]
        return events

    async def subscribe(self, job_id: str, since: int, sink: Sink) -> Subscription:
        sub = Subscription(job_id, since, sink, self.fetch)
        self.subs[job_id].add(sub)
        try:
            replay = await self.fetch(job_id, since)
        except BaseException:
            self.unsubscribe(sub)
            raise
        await sub.start(replay)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.cancel()
        subs = self.subs.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.subs[sub.job_id]

    async def wait_for(self, job_id: str, after_seq: int, timeout_s: float) -> None:
        """Return when the job has an event with seq > after_seq, or after timeout_s (long-polling)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (after_seq, fut)
        self.waiters[job_id].append(entry)
        try:
            recent = await self.fetch(job_id, after_seq)
            if recent:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout_s)
        finally:
            lst = self.waiters.get(job_id)
            if lst is not None:
                with contextlib.suppress(ValueError):
                    lst.remove(entry)
                if not lst:
                    del self.waiters[job_id]


HUB = web.AppKey("hub", Hub)


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    from orchestrator.web import CORE

    hub = Hub(app[CORE])
    app[HUB] = hub
    task = asyncio.create_task(hub.run(), name="event-subscription")
    hub._task = task
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hub.connected.wait(), 5)
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
