"""Live events over /ws, SSE, long-polling and subscribe tokens, through real processes."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import time
from typing import Any

import aiohttp
import pytest
from support import FINAL, Api, Stack

STACK_ENV = {"ORCH_REDIS_MAX_CONNECTIONS": "8"}


@pytest.fixture
async def api(stack: Stack, http: aiohttp.ClientSession) -> Api:
    return Api(http, stack.url, (await stack.user(credits=500)).api_key)


async def ws_collect(
    ws: aiohttp.ClientWebSocketResponse, job_ids: set[str], timeout_s: float = 60
) -> dict[str, list[dict[str, Any]]]:
    """Messages per job until each job's final event (bounded)."""
    out: dict[str, list[dict[str, Any]]] = {j: [] for j in job_ids}
    done: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while done != job_ids:
        msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data.get("jobId") in out:
            out[data["jobId"]].append(data)
            if data.get("type") == "status" and data.get("status") in FINAL:
                done.add(data["jobId"])
    return out


def event_seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in messages if m["type"] in ("status", "progress", "log")]


async def test_ws_requires_auth_before_upgrade(stack: Stack, http: aiohttp.ClientSession):
    for url in (stack.url + "/ws", stack.url + "/ws?token=st_forged", stack.url + "/ws?token=garbage"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(url)
        assert info.value.status == 401


async def test_ws_snapshot_then_every_event_in_order(api: Api, http: aiohttp.ClientSession, stack: Stack):
    jobs = [await api.submit("generate", {"seconds": 0.5, "ticks": 10}, type="sleep") for _ in range(3)]
    ids = {j["jobId"] for j in jobs}
    query = "&".join(f"jobId={j}" for j in ids)
    async with http.ws_connect(f"{stack.url}/ws?{query}", headers=api.headers()) as ws:
        got = await ws_collect(ws, ids)
    for job_id, messages in got.items():
        assert messages[0]["type"] == "subscribed" and messages[0]["job"]["jobId"] == job_id
        seqs = event_seqs(messages)
        assert seqs == list(range(1, seqs[-1] + 1)), seqs
        final = await api.job(job_id)
        assert final["seq"] == seqs[-1] and final["status"] == "completed"
        assert messages[-1]["data"]["result"]["seconds"] == 0.5


async def test_ws_subscribe_since_replays_only_newer_and_ping(api: Api, http: aiohttp.ClientSession, stack: Stack):
    job = await api.submit("generate", {"seconds": 0, "ticks": 3}, type="sleep")
    done = await api.wait(job["jobId"])
    async with http.ws_connect(stack.url + "/ws", headers=api.headers()) as ws:
        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json(timeout=10)) == {"type": "pong"}
        await ws.send_json({"type": "subscribe", "jobId": job["jobId"], "since": 3})
        got = await ws_collect(ws, {job["jobId"]})
        assert event_seqs(got[job["jobId"]]) == list(range(4, done["seq"] + 1))
        await ws.send_json({"type": "unsubscribe", "jobId": job["jobId"]})
        assert (await ws.receive_json(timeout=10)) == {"type": "unsubscribed", "jobId": job["jobId"]}


async def test_ws_errors_keep_the_socket_open(api: Api, http: aiohttp.ClientSession, stack: Stack):
    other = Api(http, stack.url, (await stack.user()).api_key)
    foreign = await other.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    async with http.ws_connect(stack.url + "/ws", headers=api.headers()) as ws:
        bad = [
            "not json",
            "[]",
            '{"type": 5}',
            '{"type": "dance"}',
            '{"type": "subscribe"}',
            '{"type": "subscribe", "jobId": "x", "since": -1}',
            '{"type": "subscribe", "jobId": "x", "since": "a"}',
        ]
        for text in bad:
            await ws.send_str(text)
            msg = await ws.receive_json(timeout=10)
            assert msg["type"] == "error" and msg["code"] == "BAD_REQUEST", (text, msg)
        for job_id in ("does-not-exist", foreign["jobId"]):
            await ws.send_json({"type": "subscribe", "jobId": job_id})
            msg = await ws.receive_json(timeout=10)
            assert msg == {"type": "error", "code": "NOT_FOUND", "message": "job not found", "jobId": job_id}
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive_json(timeout=10))["code"] == "BAD_REQUEST"
        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json(timeout=10)) == {"type": "pong"}


async def test_ws_oversized_message_closes_only_that_socket(api: Api, http: aiohttp.ClientSession, stack: Stack):
    async with (
        http.ws_connect(stack.url + "/ws", headers=api.headers()) as good,
        http.ws_connect(stack.url + "/ws", headers=api.headers()) as bad,
    ):
        await bad.send_str(json.dumps({"type": "ping", "pad": "x" * 100_000}))
        msg = await bad.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        await good.send_json({"type": "ping"})
        assert (await good.receive_json(timeout=10)) == {"type": "pong"}


async def test_subscribe_token_opens_ws_and_stream_and_nothing_else(
    api: Api, http: aiohttp.ClientSession, stack: Stack
):
    job = await api.submit("generate", {"seconds": 0.3, "ticks": 3}, type="sleep")
    other_job = await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    status, tok, _ = await api.call("POST", "/api/tokens", json={"jobIds": [job["jobId"]], "ttlSeconds": 60})
    assert status == 201 and tok["token"] and tok["expiresAt"].endswith("Z")
    token = tok["token"]
    async with http.ws_connect(f"{stack.url}/ws?token={token}") as ws:
        await ws.send_json({"type": "subscribe", "jobId": other_job["jobId"]})
        assert (await ws.receive_json(timeout=10))["code"] == "NOT_FOUND"
        await ws.send_json({"type": "subscribe", "jobId": job["jobId"]})
        got = await ws_collect(ws, {job["jobId"]})
        assert event_seqs(got[job["jobId"]])[0] == 1
    async with http.get(f"{stack.url}/api/jobs/{job['jobId']}/stream?token={token}") as r:
        assert r.status == 200
    bearer = {"Authorization": f"Bearer {token}"}
    for method, path in [
        ("GET", f"/api/jobs/{job['jobId']}"),
        ("POST", "/api/generate"),
        ("GET", "/api/jobs"),
        ("POST", "/api/tokens"),
    ]:
        async with http.request(method, stack.url + path, headers=bearer, json={"input": {}}) as r:
            assert r.status in (401, 403), (path, r.status)
        async with http.request(method, f"{stack.url}{path}?token={token}", json={"input": {}}) as r:
            assert r.status in (401, 403), (path, r.status)
    status, err, _ = await api.call("POST", "/api/tokens", json={"ttlSeconds": 0})
    assert status == 422 and err["error"]["code"] == "VALIDATION_ERROR"
    status, err, _ = await api.call("POST", "/api/tokens", json={"jobIds": ["nope"]})
    assert status == 404 and err["error"]["code"] == "NOT_FOUND"


async def test_expired_token_is_refused(api: Api, http: aiohttp.ClientSession, stack: Stack):
    _, tok, _ = await api.call("POST", "/api/tokens", json={"ttlSeconds": 1})
    await asyncio.sleep(1.5)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"{stack.url}/ws?token={tok['token']}")
    assert info.value.status == 401


async def read_sse(resp: aiohttp.ClientResponse, timeout_s: float = 60) -> list[dict[str, Any]]:
    """Parse SSE frames until the stream ends."""
    frames: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(resp.content.readline(), timeout=max(0.1, deadline - time.monotonic()))
        if not line:
            return frames
        text = line.decode().rstrip("\n")
        if text == "":
            if current:
                frames.append(current)
                current = {}
        elif text.startswith(":"):
            frames.append({"comment": text})
        else:
            key, _, value = text.partition(": ")
            current[key] = value
    raise TimeoutError("stream did not end")


async def test_sse_snapshot_events_and_end(api: Api, http: aiohttp.ClientSession, stack: Stack):
    job = await api.submit("generate", {"seconds": 0.3, "ticks": 4}, type="sleep")
    async with http.get(f"{stack.url}/api/jobs/{job['jobId']}/stream", headers=api.headers()) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        frames = await read_sse(r)
    assert frames[0]["event"] == "snapshot"
    assert json.loads(frames[0]["data"])["jobId"] == job["jobId"]
    events = [f for f in frames[1:] if "id" in f]
    assert [int(f["id"]) for f in events] == list(range(1, len(events) + 1))
    assert all(json.loads(f["data"])["type"] == f["event"] for f in events)
    assert json.loads(events[-1]["data"])["status"] == "completed"


async def test_sse_resumes_after_last_event_id(api: Api, http: aiohttp.ClientSession, stack: Stack):
    job = await api.submit("generate", {"seconds": 0, "ticks": 5}, type="sleep")
    done = await api.wait(job["jobId"])
    async with http.get(
        f"{stack.url}/api/jobs/{job['jobId']}/stream", headers=api.headers({"Last-Event-ID": "4"})
    ) as r:
        frames = await read_sse(r)
    assert [int(f["id"]) for f in frames if "id" in f] == list(range(5, done["seq"] + 1))
    async with http.get(f"{stack.url}/api/jobs/{job['jobId']}/stream?since=6", headers=api.headers()) as r:
        frames = await read_sse(r)
    assert [int(f["id"]) for f in frames if "id" in f] == list(range(7, done["seq"] + 1))


async def test_long_poll_answers_when_something_changes(api: Api):
    job = await api.submit("generate", {"seconds": 1.0, "ticks": 2}, type="sleep")
    seq = job["seq"]
    seen = [seq]
    for _ in range(20):
        status, body, _ = await api.call(
            "GET", f"/api/jobs/{job['jobId']}", params={"waitSeconds": 30, "afterSeq": seq}
        )
        assert status == 200 and body["seq"] > seq
        seq = body["seq"]
        seen.append(seq)
        if body["status"] in FINAL:
            break
    assert body["status"] == "completed"
    assert seen == sorted(seen)
    status, same, _ = await api.call("GET", f"/api/jobs/{job['jobId']}", params={"waitSeconds": 1, "afterSeq": seq})
    assert status == 200 and same["seq"] == seq


async def test_progress_events_carry_eta(api: Api):
    job = await api.submit("generate", {"seconds": 0.4, "ticks": 4}, type="sleep")
    await api.wait(job["jobId"])
    progress = [e for e in await api.events(job["jobId"]) if e["type"] == "progress"]
    assert all("etaSeconds" in e and e["etaSeconds"] >= 0 for e in progress)
    assert progress[-1]["etaSeconds"] == 0


def _leave_mid_stream(port: int, path: str, key: str) -> None:
    """A client that asks for a stream, reads its first bytes and then resets the connection."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server fills it fast
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    assert sock.recv(256).startswith(b"HTTP/1.1 200")  # the snapshot; the replay is being read
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST


async def test_a_client_leaving_the_replay_of_a_finished_job_is_not_a_server_error(
    api: Api, http: aiohttp.ClientSession, stack: Stack
):
    job = await api.submit("generate", {"seconds": 0, "ticks": 1000}, type="sleep")
    await api.wait(job["jobId"], timeout_s=120)
    path = f"/api/jobs/{job['jobId']}/stream"
    for _ in range(3):
        await asyncio.to_thread(_leave_mid_stream, stack.apis[0][1], path, api.key)
    async with http.get(f"{stack.url}/healthz") as r:
        assert r.status == 200
    async with http.get(f"{stack.url}/metrics") as r:
        text = await r.text()
    stream_statuses = set(re.findall(r'_count\{method="GET",route="/api/jobs/\{job_id\}/stream",status="(\d+)"', text))
    assert "500" not in stream_statuses, stream_statuses
    log = (stack.root / "logs" / f"api-{stack.apis[0][1]}.log").read_text()
    assert "unhandled error" not in log


async def test_an_open_socket_is_closed_when_its_token_expires(api: Api, http: aiohttp.ClientSession, stack: Stack):
    job = await api.submit("generate", {"seconds": 60, "ticks": 60}, type="sleep")
    _, tok, _ = await api.call("POST", "/api/tokens", json={"ttlSeconds": 2})
    try:
        async with http.ws_connect(f"{stack.url}/ws?token={tok['token']}&jobId={job['jobId']}") as ws:
            expired = None
            deadline = time.monotonic() + 30
            while expired is None and time.monotonic() < deadline:
                msg = await ws.receive(timeout=30)
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                data = json.loads(msg.data)
                if data["type"] == "error":
                    expired = data
            assert expired is not None and expired["code"] == "TOKEN_EXPIRED" and expired["message"]
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4001
    finally:
        await api.call("DELETE", f"/api/jobs/{job['jobId']}")


async def test_a_burst_of_sockets_keeps_the_redis_connections_bounded(
    api: Api, http: aiohttp.ClientSession, stack: Stack
):
    import redis.asyncio as aioredis

    job = await api.submit("generate", {"seconds": 0, "ticks": 5}, type="sleep")
    await api.wait(job["jobId"])
    url = f"{stack.url}/ws?jobId={job['jobId']}"

    async def one() -> None:
        try:
            ws = await http.ws_connect(url, headers=api.headers())
        except aiohttp.WSServerHandshakeError:
            return  # past the per-user cap: refused, after asking Redis all the same
        await ws.receive(timeout=30)
        await ws.close()

    await asyncio.gather(*(one() for _ in range(205)))
    assert stack.redis is not None
    r = aioredis.Redis.from_url(stack.redis.url)
    try:
        clients = await r.client_list()
    finally:
        await r.aclose()
    # two pools of at most ORCH_REDIS_MAX_CONNECTIONS (8) in the API process, the rate limiter,
    # the event subscription, the workers and this client
    assert len(clients) <= 2 * 8 + 20, len(clients)
