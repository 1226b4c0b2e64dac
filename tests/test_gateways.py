"""Several API processes on one Redis and database; restarts; slow consumers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time

import aiohttp
from support import FINAL, Api, Stack

STACK_ENV = {"ORCH_WS_OUTBOX_MESSAGES": "64"}


async def test_socket_on_one_api_gets_job_submitted_through_another(stack: Stack, http: aiohttp.ClientSession):
    if len(stack.apis) < 2:
        stack.start_api()
    user = await stack.user(credits=100)
    submitter = Api(http, stack.url_of(1), user.api_key)
    async with http.ws_connect(stack.url_of(0) + "/ws", headers=submitter.headers()) as ws:
        job = await submitter.submit("generate", {"seconds": 0.5, "ticks": 10}, type="sleep")
        await ws.send_json({"type": "subscribe", "jobId": job["jobId"], "since": 0})
        seqs: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = await ws.receive_json(timeout=30)
            if msg["type"] in ("status", "progress", "log"):
                seqs.append(msg["seq"])
                if msg["type"] == "status" and msg["status"] in FINAL:
                    break
    assert seqs == list(range(1, seqs[-1] + 1))
    assert seqs[-1] == (await submitter.job(job["jobId"]))["seq"]


async def test_client_resumes_on_a_new_api_process_with_every_event_once(stack: Stack, http: aiohttp.ClientSession):
    if len(stack.apis) < 2:
        stack.start_api()
    user = await stack.user(credits=100)
    api = Api(http, stack.url_of(1), user.api_key)
    job = await api.submit("generate", {"seconds": 4, "ticks": 40}, type="sleep")
    received: list[int] = []
    async with http.ws_connect(stack.url_of(0) + "/ws", headers=api.headers()) as ws:
        await ws.send_json({"type": "subscribe", "jobId": job["jobId"]})
        while len(received) < 8:
            msg = await ws.receive(timeout=30)
            assert msg.type == aiohttp.WSMsgType.TEXT
            data = json.loads(msg.data)
            if data["type"] in ("status", "progress", "log"):
                received.append(data["seq"])
        stack.restart_api(0)  # the process holding our socket goes away mid-job
        for _ in range(100):
            msg = await ws.receive(timeout=30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if data["type"] in ("status", "progress", "log"):
                received.append(data["seq"])
    # reconnect (to the restarted process) with since
    async with http.ws_connect(stack.url_of(0) + "/ws", headers=api.headers()) as ws:
        await ws.send_json({"type": "subscribe", "jobId": job["jobId"], "since": received[-1]})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            data = await ws.receive_json(timeout=30)
            if data["type"] in ("status", "progress", "log"):
                received.append(data["seq"])
                if data["type"] == "status" and data["status"] in FINAL:
                    break
    final = await api.job(job["jobId"])
    assert final["status"] == "completed"
    assert received == list(range(1, final["seq"] + 1))


def _raw_ws(port: int, key: str) -> socket.socket:
    """A WebSocket client that never reads: a small receive buffer and a manual handshake."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    nonce = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert b" 101 " in head.split(b"\r\n", 1)[0], head
    return s


def _frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    return header + mask + masked


async def test_slow_consumer_is_disconnected_and_others_are_not_delayed(stack: Stack, http: aiohttp.ClientSession):
    user = await stack.user(credits=100)
    api = Api(http, stack.url, user.api_key)
    job = await api.submit("generate", {"seconds": 0, "ticks": 300}, type="sleep")
    await api.wait(job["jobId"], timeout_s=120)
    port = stack.apis[0][1]
    slow = await asyncio.to_thread(_raw_ws, port, user.api_key)
    subscribe = _frame(json.dumps({"type": "subscribe", "jobId": job["jobId"], "since": 0}))
    try:
        async with http.ws_connect(stack.url + "/ws", headers=api.headers()) as healthy:
            disconnected = False
            for _ in range(400):  # each subscribe replays ~300 events: far more than the socket holds
                try:
                    await asyncio.to_thread(slow.sendall, subscribe)
                except OSError:
                    disconnected = True
                    break
                await healthy.send_json({"type": "ping"})
                assert (await healthy.receive_json(timeout=10)) == {"type": "pong"}
            slow.settimeout(30)
            deadline = time.monotonic() + 60
            while not disconnected and time.monotonic() < deadline:
                try:
                    if not await asyncio.to_thread(slow.recv, 1 << 20):
                        disconnected = True
                except OSError:
                    disconnected = True
                await healthy.send_json({"type": "ping"})  # answered meanwhile (and its heartbeats too)
                assert (await healthy.receive_json(timeout=10)) == {"type": "pong"}
            assert disconnected
            await healthy.send_json({"type": "ping"})
            assert (await healthy.receive_json(timeout=10)) == {"type": "pong"}
    finally:
        slow.close()


async def test_overflowing_connection_closes_with_1013():
    """The gateway's rule itself: a backlog past the outbox size closes that socket with 1013
    (try again later), and a socket whose buffer has room gets its messages at once, in order."""
    from ws_gateway.websocket import Connection

    class FakeWs:
        closed = False
        closed_with: int | None = None

        async def close(self, code: int, message: bytes = b"") -> bool:
            self.closed, self.closed_with = True, code
            return True

    class FakeTransport:
        def __init__(self, room: int) -> None:
            self.room, self.written = room, []  # type: ignore[var-annotated]

        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return 0 if len(self.written) < self.room else 1 << 20

        def get_write_buffer_limits(self) -> tuple[int, int]:
            return (16384, 65536)

        def write(self, data: bytes) -> None:
            self.written.append(data)

    class FakeWriter:
        def __init__(self, room: int) -> None:
            self.transport = FakeTransport(room)

        async def drain(self) -> None:
            await asyncio.Event().wait()  # the client never reads

    roomy = FakeWriter(room=100)
    conn = Connection(FakeWs(), hub=None, user=None, max_subs=1, outbox=3, writer=roomy)  # type: ignore[arg-type]
    for i in range(5):
        conn.send(f"m{i}")
    assert [w[2:] for w in roomy.transport.written] == [f"m{i}".encode() for i in range(5)]
    assert conn.backlog is None

    fake, stuck = FakeWs(), FakeWriter(room=0)
    conn = Connection(fake, hub=None, user=None, max_subs=1, outbox=3, writer=stuck)  # type: ignore[arg-type]
    for i in range(3):
        conn.send(f"m{i}")
    assert conn.backlog is not None and len(conn.backlog) == 3 and not conn.overflowed
    conn.send("m3")
    await asyncio.sleep(0)
    assert conn.overflowed and fake.closed_with == 1013
    assert stuck.transport.written == []


def test_collector_freezes_what_sockets_keep_and_thaws_after_churn():
    """What new sockets keep leaves the collector's sight after the next young collection;
    enough closed sockets bring everything back for one full pass (ws_gateway.collector)."""
    import gc

    from ws_gateway.collector import MIN_THAW_SOCKETS, Collector

    c = Collector()
    before = gc.get_freeze_count()
    gc.callbacks.append(c.after_collection)
    try:
        gc.collect(1)
        assert gc.get_freeze_count() == before  # nothing opened: nothing frozen
        for _ in range(3):
            c.socket_opened()
        kept = [[i] for i in range(1000)]  # what the sockets hold
        gc.collect(1)
        assert gc.get_freeze_count() >= before + len(kept)
        assert c.frozen == 3 and c.opened == 0
        assert not c.thaw_if_due()
        for _ in range(MIN_THAW_SOCKETS):
            c.socket_closed()
        assert c.thaw_if_due()
        assert c.closed == 0 and c.frozen == c.open
    finally:
        gc.callbacks.remove(c.after_collection)
        gc.unfreeze()
