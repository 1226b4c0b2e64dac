"""`GET /api/jobs/{id}/stream`: Server-Sent Events. A `snapshot` first, then every event after
`Last-Event-ID` (or `?since=`) with `id: <seq>`, then live ones; ends after the final event."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

import orjson
from aiohttp import web

from metrics.realtime import SSE_CLIENTS, event_time, observe_lag
from orchestrator import api_models as m
from orchestrator import jobs
from orchestrator.errors import BadRequest, NotFound
from orchestrator.views import FINAL, job_resource
from orchestrator.web import core, principal, query
from ws_gateway.hub import HUB

KEEPALIVE_S = 15.0
OUTBOX_SIZE = 4096


def _frame(event: dict[str, Any], raw: bytes) -> bytes:
    data = raw or orjson.dumps(event)
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event["seq"], event["type"].encode(), data)


async def stream_handler(request: web.Request) -> web.StreamResponse:
    user = await principal(request, allow_token=True)
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

    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await resp.prepare(request)
    await resp.write(b"event: snapshot\ndata: " + orjson.dumps(job_resource(job)) + b"\n\n")
    if job.status in FINAL:
        # nothing more will happen: send the stored history after `since` (if retention kept it) and end
        for event in await request.app[HUB].fetch(job_id, since):
            await resp.write(_frame(event, b""))
        return resp

    outbox: asyncio.Queue[tuple[dict[str, Any], bytes]] = asyncio.Queue(OUTBOX_SIZE)
    overflow = asyncio.Event()

    def sink(event: dict[str, Any], raw: bytes) -> None:
        try:
            outbox.put_nowait((event, raw))
        except asyncio.QueueFull:
            overflow.set()

    hub = request.app[HUB]
    SSE_CLIENTS.inc()
    sub = await hub.subscribe(job_id, since, sink)
    try:
        while not overflow.is_set():
            try:
                event, raw = await asyncio.wait_for(outbox.get(), KEEPALIVE_S)
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            await resp.write(_frame(event, raw))
            observe_lag("sse", event_time(event), time.time())
            if event["type"] == "status" and event["status"] in FINAL:
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        SSE_CLIENTS.dec()
        hub.unsubscribe(sub)
    with contextlib.suppress(Exception):
        await resp.write_eof()
    return resp
