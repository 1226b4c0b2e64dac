"""`GET /ws`: many jobs per socket, each delivered in seq order (see ws_gateway.subscription)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from metrics.realtime import WS_CLIENTS, WS_MESSAGES, event_time, observe_lag
from orchestrator import jobs
from orchestrator.api_models import MAX_SEQ
from orchestrator.auth import Principal
from orchestrator.errors import ApiError, NotFound
from orchestrator.views import job_resource
from orchestrator.web import core, principal
from ws_gateway.hub import HUB, Hub
from ws_gateway.limits import SocketSlots
from ws_gateway.subscription import Subscription

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 16 * 1024
OUTBOX_SIZE = 2048
"""Messages held for one socket; a consumer that falls this far behind is closed with 1013."""
HEARTBEAT_S = 20.0
TRY_AGAIN_LATER = 1013
SOCKET_SLOTS = web.AppKey("socket_slots", SocketSlots)
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets")


class Connection:
    def __init__(
        self, ws: web.WebSocketResponse, hub: Hub, user: Principal, max_subs: int, outbox: int = OUTBOX_SIZE
    ) -> None:
        self.ws = ws
        self.hub = hub
        self.user = user
        self.max_subs = max_subs
        self.subs: dict[str, Subscription] = {}
        self.outbox: asyncio.Queue[tuple[bytes | str, float]] = asyncio.Queue(outbox)
        self.overflowed = False
        self._closing: asyncio.Future[bool] | None = None

    # ---- writing ---------------------------------------------------------------------------

    def send(self, payload: bytes | str, stored_at: float = 0.0) -> None:
        if self.overflowed:
            return
        try:
            self.outbox.put_nowait((payload, stored_at))
        except asyncio.QueueFull:
            self.overflowed = True
            self._closing = asyncio.ensure_future(
                self.ws.close(code=TRY_AGAIN_LATER, message=b"consumer too slow; reconnect with since")
            )

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send(orjson.dumps(obj).decode())

    def sink_for(self, job_id: str) -> Any:
        def sink(event: dict[str, Any], raw: bytes) -> None:
            self.send(raw.decode() if raw else orjson.dumps(event).decode(), event_time(event))

        return sink

    async def writer(self) -> None:
        while True:
            payload, stored_at = await self.outbox.get()
            if self.ws.closed:
                return
            await self.ws.send_str(payload if isinstance(payload, str) else payload.decode())
            WS_MESSAGES.inc()
            if stored_at:
                observe_lag("ws", stored_at, time.time())

    # ---- reading ---------------------------------------------------------------------------

    def error(self, code: str, message: str, job_id: str | None = None) -> None:
        msg: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if job_id is not None:
            msg["jobId"] = job_id
        self.send_json(msg)

    async def handle(self, text: str) -> None:
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.error("BAD_REQUEST", "message is not valid JSON")
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            self.error("BAD_REQUEST", 'message must be an object with a "type"')
            return
        kind = msg["type"]
        if kind == "ping":
            self.send_json({"type": "pong"})
            return
        if kind not in ("subscribe", "unsubscribe"):
            self.error("BAD_REQUEST", f"unknown message type {kind[:40]!r}")
            return
        job_id = msg.get("jobId")
        if not isinstance(job_id, str) or not 0 < len(job_id) <= 64:
            self.error("BAD_REQUEST", "jobId must be a non-empty string")
            return
        if kind == "unsubscribe":
            sub = self.subs.pop(job_id, None)
            if sub is not None:
                self.hub.unsubscribe(sub)
            self.send_json({"type": "unsubscribed", "jobId": job_id})
            return
        since = msg.get("since", 0)
        if since is None:
            since = 0
        if isinstance(since, bool) or not isinstance(since, int) or not 0 <= since <= MAX_SEQ:
            self.error("BAD_REQUEST", "since must be a non-negative integer", job_id)
            return
        await self.subscribe(job_id, since)

    async def subscribe(self, job_id: str, since: int) -> None:
        if not self.user.may_read(job_id):
            self.error("NOT_FOUND", "job not found", job_id)
            return
        if job_id not in self.subs and len(self.subs) >= self.max_subs:
            self.error("TOO_MANY_SUBSCRIPTIONS", f"at most {self.max_subs} subscriptions per socket", job_id)
            return
        try:
            job = await jobs.get_job(self.hub.core.db, job_id, self.user.user_id)
        except NotFound:
            self.error("NOT_FOUND", "job not found", job_id)
            return
        except ApiError as exc:
            self.error(exc.code, exc.message, job_id)
            return
        old = self.subs.pop(job_id, None)
        if old is not None:
            self.hub.unsubscribe(old)
        self.send_json({"type": "subscribed", "jobId": job_id, "job": job_resource(job)})
        try:
            self.subs[job_id] = await self.hub.subscribe(job_id, since, self.sink_for(job_id))
        except ApiError as exc:
            self.error(exc.code, exc.message, job_id)
        except Exception:  # never let one subscription take the socket down
            log.exception("subscribe to %s failed", job_id)
            self.error("INTERNAL", "subscription failed; try again", job_id)

    def close_all(self) -> None:
        for sub in self.subs.values():
            self.hub.unsubscribe(sub)
        self.subs.clear()


async def ws_handler(request: web.Request) -> web.StreamResponse:
    user = await principal(request, allow_token=True)  # 401 here, before the upgrade
    c = core(request)
    slots: SocketSlots = request.app[SOCKET_SLOTS]
    await slots.acquire(user.user_id)
    try:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES, compress=False)
        await ws.prepare(request)
        conn = Connection(
            ws, request.app[HUB], user, c.settings.max_subscriptions_per_socket, c.settings.ws_outbox_messages
        )
        WS_CLIENTS.inc()
        request.app[SOCKETS].add(ws)
        writer = asyncio.create_task(conn.writer())
        try:
            for job_id in request.query.getall("jobId", [])[: conn.max_subs]:
                await conn.subscribe(job_id, 0)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await conn.handle(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    conn.error("BAD_REQUEST", "send JSON text frames")
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            WS_CLIENTS.dec()
            request.app[SOCKETS].discard(ws)
            conn.close_all()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
        return ws
    finally:
        await slots.release(user.user_id)


async def close_all_sockets(app: web.Application) -> None:
    """On shutdown: tell every client to reconnect elsewhere (GOING_AWAY)."""
    sockets = app[SOCKETS]
    for ws in tuple(sockets):
        with contextlib.suppress(Exception):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
