"""`GET /ws`: many jobs per socket, each delivered in seq order (see ws_gateway.subscription).

Writing: a message is a prebuilt WebSocket frame (an event's frame is built once per process
and shared by every socket, ws_gateway.message) written straight to the socket's transport
when its buffer has room. Only a socket whose buffer is full gets a backlog and, while the
backlog lasts, a task that drains it; one whose backlog passes the outbox size is closed with
1013. Every message of a socket goes the same way, so a socket's messages keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

from metrics.realtime import WS_CLIENTS, WS_TALLY
from orchestrator.core.auth import Principal
from orchestrator.errors import ApiError, NotFound
from orchestrator.web import core
from orchestrator.wire import MAX_SEQ
from ws_gateway.access import ACCESS
from ws_gateway.collector import COLLECTOR
from ws_gateway.hub import HUB, Hub
from ws_gateway.limits import SocketSlots
from ws_gateway.message import Message, ws_text_frame
from ws_gateway.subscription import Subscription

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 16 * 1024
OUTBOX_SIZE = 2048
"""Messages held for one socket; a consumer that falls this far behind is closed with 1013."""
HEARTBEAT_S = 20.0
TRY_AGAIN_LATER = 1013
TOKEN_EXPIRED = 4001
"""Close code when the subscribe token a socket was opened with expires."""
SOCKET_SLOTS = web.AppKey("socket_slots", SocketSlots)
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets")


class Connection:
    __slots__ = (
        "_closing",
        "_expiry",
        "_flusher",
        "backlog",
        "hub",
        "max_subs",
        "outbox",
        "overflowed",
        "subs",
        "transport",
        "user",
        "writer",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        hub: Hub,
        user: Principal,
        max_subs: int,
        outbox: int = OUTBOX_SIZE,
        writer: AbstractStreamWriter | None = None,
    ) -> None:
        self.ws = ws
        self.hub = hub
        self.user = user
        self.max_subs = max_subs
        self.subs: dict[str, Subscription] = {}
        self.outbox = outbox
        self.backlog: deque[bytes] | None = None
        """Frames waiting for room in the transport's buffer; None while there are none."""
        self.overflowed = False
        self.writer = writer
        self.transport: asyncio.WriteTransport | None = writer.transport if writer is not None else None
        self._flusher: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[bool] | None = None
        self._expiry: asyncio.TimerHandle | None = None

    # ---- writing ---------------------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """Write one frame now if the transport has room, else queue it behind the others."""
        if self.overflowed or self.ws.closed:
            return
        t = self.transport
        if self.backlog is None:
            if t is None or t.is_closing():
                return
            if not _full(t):
                t.write(frame)
                WS_TALLY.n += 1
                return
            self.backlog = deque()
        if len(self.backlog) >= self.outbox:
            self.overflow()
            return
        self.backlog.append(frame)
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())

    def overflow(self) -> None:
        self.overflowed = True
        self.backlog = None
        self._closing = asyncio.ensure_future(
            self.ws.close(code=TRY_AGAIN_LATER, message=b"consumer too slow; reconnect with since")
        )

    async def _flush(self) -> None:
        t = self.transport
        try:
            while self.backlog and t is not None:
                assert self.writer is not None
                await self.writer.drain()  # until the buffer is below its low-water mark
                if t.is_closing() or self.ws.closed:
                    break
                while self.backlog and not _full(t):
                    t.write(self.backlog.popleft())
                    WS_TALLY.n += 1
                WS_TALLY.flush()
        except (ConnectionError, RuntimeError):
            pass  # the socket is gone; its handler cleans up
        finally:
            self.backlog = None
            self._flusher = None

    def deliver(self, msg: Message) -> None:
        """The sink of this socket's subscriptions."""
        self.send_frame(msg.ws_frame)

    def send(self, payload: str | bytes) -> None:
        self.send_frame(ws_text_frame(payload.encode() if isinstance(payload, str) else payload))

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send(orjson.dumps(obj))

    # ---- reading ---------------------------------------------------------------------------

    def error(self, code: str, message: str, job_id: str | None = None) -> None:
        msg: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if job_id is not None:
            msg["jobId"] = job_id
        self.send_json(msg)

    async def handle(self, text: str) -> None:
        try:
            await self._handle(text)
        finally:
            WS_TALLY.flush()

    async def _handle(self, text: str) -> None:
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
            self.send(b'{"type":"pong"}')
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
            frame = await self.hub.jobs.subscribed_frame(job_id, self.user.user_id)
        except NotFound:
            self.error("NOT_FOUND", "job not found", job_id)
            return
        except ApiError as exc:
            self.error(exc.code, exc.message, job_id)
            return
        except Exception as exc:  # the database is slow or down: this subscription fails, not the socket
            log.warning("reading job %s for a subscription failed: %s", job_id, exc)
            self.error("UNAVAILABLE", "the job could not be read; try again", job_id)
            return
        old = self.subs.pop(job_id, None)
        if old is not None:
            self.hub.unsubscribe(old)
        self.send_frame(frame)
        try:
            self.subs[job_id] = await self.hub.subscribe(job_id, since, self.deliver)
        except ApiError as exc:
            self.error(exc.code, exc.message, job_id)
        except Exception:  # never let one subscription take the socket down
            log.exception("subscribe to %s failed", job_id)
            self.error("INTERNAL", "subscription failed; try again", job_id)

    def expire_at(self, expires_at: float) -> None:
        """Tell the client and close (4001) when its subscribe token expires."""
        delay = max(0.0, expires_at - time.time())
        self._expiry = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        self.error("TOKEN_EXPIRED", "the subscribe token has expired; reconnect with a new one")
        WS_TALLY.flush()
        self.close_all()
        self._closing = asyncio.ensure_future(self._close_after_backlog(TOKEN_EXPIRED, b"token expired"))

    async def _close_after_backlog(self, code: int, message: bytes) -> bool:
        """Close once what is queued (the last error included) is written, or after 5 s."""
        flusher = self._flusher
        if flusher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(flusher), 5)
        return await self.ws.close(code=code, message=message)

    def close_all(self) -> None:
        for sub in self.subs.values():
            self.hub.unsubscribe(sub)
        self.subs.clear()
        if self._expiry is not None:
            self._expiry.cancel()


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Cut the cycle a stored exception makes (its traceback's frames hold the socket), so a
    closed socket is freed by reference counting, without a full collection (see ws_gateway.collector)."""
    for _ in range(8):
        if exc is None:
            return
        exc.__traceback__ = None
        exc = exc.__context__ or exc.__cause__


def _full(t: asyncio.WriteTransport) -> bool:
    """True when the transport's buffer is past its high-water mark (it has paused its writer)."""
    return t.get_write_buffer_size() > t.get_write_buffer_limits()[1]


async def ws_handler(request: web.Request) -> web.StreamResponse:
    reader = await request.app[ACCESS].reader(request)  # 401 here, before the upgrade
    user = reader.principal
    c = core(request)
    slots: SocketSlots = request.app[SOCKET_SLOTS]
    await slots.acquire(user.user_id)
    try:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES, compress=False)
        writer = await ws.prepare(request)
        conn = Connection(
            ws,
            request.app[HUB],
            user,
            c.settings.max_subscriptions_per_socket,
            c.settings.ws_outbox_messages,
            writer,
        )
        if reader.expires_at is not None:
            conn.expire_at(reader.expires_at)
        WS_CLIENTS.inc()
        COLLECTOR.socket_opened()
        request.app[SOCKETS].add(ws)
        try:
            for job_id in request.query.getall("jobId", [])[: conn.max_subs]:
                await conn.subscribe(job_id, 0)
            WS_TALLY.flush()
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await conn.handle(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    conn.error("BAD_REQUEST", "send JSON text frames")
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            WS_CLIENTS.dec()
            COLLECTOR.socket_closed()
            request.app[SOCKETS].discard(ws)
            conn.close_all()
            _drop_tracebacks(ws.exception())
            flusher = conn._flusher
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await flusher
        return ws
    finally:
        slots.release(user.user_id)


async def close_all_sockets(app: web.Application) -> None:
    """On shutdown: tell every client to reconnect elsewhere (GOING_AWAY)."""
    sockets = app[SOCKETS]
    for ws in tuple(sockets):
        with contextlib.suppress(Exception):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
