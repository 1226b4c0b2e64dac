"""`GET /api/jobs/{id}/stream`: Server-Sent Events. A `snapshot` first, then every event after
`Last-Event-ID` (or `?since=`) with `id: <seq>`, then live ones; ends after the final event.

A stream holds one of its user's slots (ws_gateway.limits) like a socket. A client that goes
away at any point ends the stream quietly: it is not an error of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import orjson
from aiohttp import web

from metrics.realtime import SSE_CLIENTS, observe_lag
from orchestrator import wire as m
from orchestrator.core import jobs
from orchestrator.core.views import job_resource
from orchestrator.errors import BadRequest, NotFound
from orchestrator.states import FINAL
from orchestrator.web import core, query
from ws_gateway.access import ACCESS
from ws_gateway.hub import HUB
from ws_gateway.message import Message
from ws_gateway.websocket import SOCKET_SLOTS

KEEPALIVE_S = 15.0
OUTBOX_SIZE = 4096


async def stream_handler(request: web.Request) -> web.StreamResponse:
    user = (await request.app[ACCESS].reader(request)).principal
    q = query(request, m.StreamQuery)
    job_id = request.match_info["job_id"]
    if not user.may_read(job_id):
        raise NotFound("job not found")
    job = await jobs.get_job(core(request).db, job_id, user.user_id)
    since = q.since or 0
    last_id = request.headers.get("Last-Event-ID")
    if last_id:
        if not re.fullmatch(r"[0-9]{1,10}", last_id) or int(last_id) > m.MAX_SEQ:
            raise BadRequest("Last-Event-ID must be an event seq")
        since = int(last_id)
    slots = request.app[SOCKET_SLOTS]
    await slots.acquire(user.user_id)
    try:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache, no-transform",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        try:
            await resp.write(b"event: snapshot\ndata: " + orjson.dumps(job_resource(job)) + b"\n\n")
            if job.status in FINAL:
                # nothing more will happen: the stored history after `since` (if retention kept it)
                for msg in await request.app[HUB].fetch(job_id, since):
                    await resp.write(msg.sse_frame)
            else:
                await _follow(request, resp, job_id, since)
        except (ConnectionError, asyncio.CancelledError):
            return resp  # the client went away
        with contextlib.suppress(Exception):
            await resp.write_eof()
        return resp
    finally:
        slots.release(user.user_id)


async def _follow(request: web.Request, resp: web.StreamResponse, job_id: str, since: int) -> None:
    outbox: asyncio.Queue[Message] = asyncio.Queue(OUTBOX_SIZE)
    overflow = asyncio.Event()

    def sink(msg: Message) -> None:
        try:
            outbox.put_nowait(msg)
        except asyncio.QueueFull:
            overflow.set()

    hub = request.app[HUB]
    SSE_CLIENTS.inc()
    try:
        sub = await hub.subscribe(job_id, since, sink)
        try:
            while not overflow.is_set():
                try:
                    msg = await asyncio.wait_for(outbox.get(), KEEPALIVE_S)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                await resp.write(msg.sse_frame)
                observe_lag("sse", msg.stored_at, time.time())
                if msg.final:
                    break
        finally:
            hub.unsubscribe(sub)
    finally:
        SSE_CLIENTS.dec()
