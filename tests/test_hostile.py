"""Hostile input (issue 5): oversized and slow bodies, deep JSON, huge numbers, unicode, header
injection, odd API keys, expired and forged subscribe tokens, path traversal, webhook URLs aimed
inside. Each gets the contract's answer in the contract's error shape, leaves the caller's
credits, jobs and ledger as they were, and leaves the process up.

Requests whose bytes matter (raw header bytes, unnormalised paths, chunked or slow bodies) go over
a plain TCP connection (`raw`), so no client library cleans them up first."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import hypothesis
import pytest
from hypothesis import strategies as st
from support import Api, Stack

from orchestrator.core import accounts
from orchestrator.core.auth import TOKEN_PREFIX, Tokens
from orchestrator.delivery.ssrf import check_url
from orchestrator.errors import ValidationFailed
from orchestrator.web import MAX_FIELD_ERRORS

STACK_ENV = {"ORCH_WEBHOOK_ALLOW_PRIVATE": "0", "ORCH_REDELIVER_RATE": "5/minute"}
STACK_WORKERS = 1
MIB = 1024 * 1024
LIMIT = MIB  # the default body limit


# ---- helpers -----------------------------------------------------------------------------------


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader) -> Raw:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
    else:
        body = await reader.read()
    return Raw(status, headers, body)


def request_head(method: str, path: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    upgrade = any(k.lower() == b"upgrade" for k, _ in headers)
    lines = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines.append(b"Connection: Upgrade" if upgrade else b"Connection: close")
    lines += [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def raw(
    stack: Stack,
    method: str,
    path: bytes | str,
    headers: list[tuple[bytes, bytes]] | None = None,
    body_parts: list[bytes] | None = None,
    pause_s: float = 0.0,
    timeout_s: float = 20,
) -> Raw:
    """One request over a fresh TCP connection, the body written in `body_parts` with pauses."""
    path = path.encode() if isinstance(path, str) else path
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.apis[0][1])
    try:
        writer.write(request_head(method, path, headers or []))
        for part in body_parts or []:
            await writer.drain()
            if pause_s:
                await asyncio.sleep(pause_s)
            writer.write(part)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), timeout_s)
    finally:
        writer.close()


def chunked(*parts: bytes) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]


def bearer(key: str | bytes) -> tuple[bytes, bytes]:
    return b"Authorization", b"Bearer " + (key.encode() if isinstance(key, str) else key)


JSON = (b"Content-Type", b"application/json")
WS_UPGRADE = [
    (b"Upgrade", b"websocket"),
    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"Sec-WebSocket-Version", b"13"),
]


class Soft:
    """Collects the failing cases of a loop, so one report names all of them."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    @contextlib.contextmanager
    def case(self, label: Any) -> Iterator[None]:
        try:
            yield
        except AssertionError as exc:
            self.failures.append(f"{label!r}: {str(exc)[:400]}")

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} case(s) failed:\n" + "\n".join(self.failures)


def assert_error(status: int, body: Any, expected: int | set[int], codes: str | set[str] | None = None) -> None:
    """The contract's error shape: {"error": {"code": UPPER_SNAKE, "message": str, "details"?}}."""
    expected = {expected} if isinstance(expected, int) else expected
    assert status in expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) <= {"code", "message", "details"}, err
    assert isinstance(err.get("code"), str) and re.fullmatch(r"[A-Z][A-Z0-9_]*", err["code"]), err
    assert isinstance(err.get("message"), str) and err["message"], err
    if codes is not None:
        assert err["code"] in ({codes} if isinstance(codes, str) else codes), err


def assert_raw_error(r: Raw, expected: int | set[int], codes: str | set[str] | None = None) -> None:
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status, r.headers, r.body[:300])
    assert_error(r.status, r.json(), expected, codes)


async def state(api: Api) -> tuple[int, list[str], int]:
    """What a refused request must not change: credits, the job list, the ledger."""
    s1, me, _ = await api.call("GET", "/api/me")
    s2, jobs, _ = await api.call("GET", "/api/jobs", params={"limit": 100})
    s3, ledger, _ = await api.call("GET", "/api/me/ledger", params={"limit": 100})
    assert (s1, s2, s3) == (200, 200, 200), (me, jobs, ledger)
    return me["credits"], [j["jobId"] for j in jobs["jobs"]], len(ledger["entries"])


def alive(stack: Stack) -> None:
    import httpx

    assert stack.apis[0][0].poll() is None, "the API process died"
    assert httpx.get(stack.url + "/healthz", timeout=10).status_code == 200


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture
async def user(stack: Stack) -> Any:
    return await stack.user(credits=50)


@pytest.fixture
async def api(stack: Stack, http: aiohttp.ClientSession, user: Any) -> Api:
    return Api(http, stack.url, user.api_key)


def padded_submit(total: int) -> bytes:
    """A JSON submit body of exactly `total` bytes (an image prompt far over 2000 chars)."""
    shell = b'{"type": "image", "input": {"prompt": "%s"}}'
    body = shell % (b"x" * (total - len(shell) + 2))
    assert len(body) == total
    return body


# ---- bodies ------------------------------------------------------------------------------------


async def test_body_just_over_the_limit_is_413_and_changes_nothing(stack: Stack, api: Api):
    before = await state(api)
    over = padded_submit(LIMIT + 1)
    soft = Soft()
    for path in ("/api/generate", "/api/tokens"):
        with soft.case((path, "content-length")):
            status, body, _ = await api.call("POST", path, data=over, headers={"Content-Type": "application/json"})
            assert_error(status, body, 413, "PAYLOAD_TOO_LARGE")
        # the same bytes without a Content-Length: one chunk, then many
        for n in (1, 5):
            with soft.case((path, f"chunked in {n}")):
                size = -(-len(over) // n)
                parts = chunked(*(over[i : i + size] for i in range(0, len(over), size)))
                headers = [bearer(api.key), JSON, (b"Transfer-Encoding", b"chunked")]
                assert_raw_error(await raw(stack, "POST", path, headers, parts), 413, "PAYLOAD_TOO_LARGE")
    soft.check()
    assert await state(api) == before


async def test_a_body_at_the_limit_is_read_whole(stack: Stack, api: Api):
    """Exactly 1 MiB of valid JSON is within the limit: it must be parsed whole (then refused for
    its 1 MiB prompt, naming the field), not cut at whatever arrived first."""
    before = await state(api)
    body = padded_submit(LIMIT)
    status, err, _ = await api.call("POST", "/api/generate", data=body, headers={"Content-Type": "application/json"})
    assert_error(status, err, 422, "VALIDATION_ERROR")
    assert "input.prompt" in {d["field"] for d in err["error"]["details"]}
    assert await state(api) == before


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_arriving_in_pieces_is_read_whole(stack: Stack, api: Api, framing: str):
    """A small valid submit whose bytes arrive in two TCP writes 0.3 s apart (any slow client)."""
    body = json.dumps({"type": "sleep", "input": {"seconds": 0, "ticks": 0}}).encode()
    half = len(body) // 2
    if framing == "chunked":
        headers, parts = [(b"Transfer-Encoding", b"chunked")], chunked(body[:half], body[half:])
    else:
        headers, parts = [(b"Content-Length", str(len(body)).encode())], [body[:half], body[half:]]
    r = await raw(stack, "POST", "/api/generate", [bearer(api.key), JSON, *headers], parts, pause_s=0.3)
    assert r.status == 202, (r.status, r.body[:300])
    assert r.json()["status"] == "queued"


async def test_a_50_mib_chunked_body_is_refused_early(stack: Stack, api: Api):
    """413 arrives while the client is still sending: the server neither reads 50 MiB nor
    buffers it, and stays up."""
    before = await state(api)
    pid = stack.apis[0][0].pid
    rss_before = rss_bytes(pid)
    total, chunk = 50 * MIB, 64 * 1024
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.apis[0][1])
    head = request_head("POST", b"/api/generate", [bearer(api.key), JSON, (b"Transfer-Encoding", b"chunked")])
    writer.write(head)
    answer = asyncio.ensure_future(read_response(reader))
    sent = 0
    first = b'{"type": "image", "input": {"prompt": "'

    async def pump() -> None:
        nonlocal sent
        while sent < total and not answer.done():
            data = first + b"x" * (chunk - len(first)) if sent == 0 else b"x" * chunk
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            sent += len(data)
            await asyncio.sleep(0)  # let the answer in as soon as it comes

    try:
        try:
            await asyncio.wait_for(pump(), 60)
        except (ConnectionError, OSError):
            pass  # the server closed after answering
        except TimeoutError:
            pytest.fail(f"the server neither answered nor read on after {sent} bytes")
        r = await asyncio.wait_for(answer, 15)
    finally:
        writer.close()
    assert_raw_error(r, 413, "PAYLOAD_TOO_LARGE")
    assert sent < 24 * MIB, f"the 413 came only after {sent / MIB:.1f} MiB"
    alive(stack)
    assert rss_bytes(pid) - rss_before < 64 * MIB
    assert await state(api) == before


async def test_a_declared_50_mib_body_is_refused_before_it_is_sent(stack: Stack, api: Api):
    before = await state(api)
    headers = [bearer(api.key), JSON, (b"Content-Length", str(50 * MIB).encode())]
    r = await raw(stack, "POST", "/api/train", headers, [], timeout_s=10)  # not one body byte sent
    assert_raw_error(r, 413, "PAYLOAD_TOO_LARGE")
    assert await state(api) == before


async def test_deeply_nested_json_is_refused_and_changes_nothing(stack: Stack, api: Api):
    before = await state(api)
    depth_over_any_parser = 200_000  # 400 kB, within the body limit
    bodies = [
        b"[" * depth_over_any_parser + b"]" * depth_over_any_parser,
        b'{"input": ' + b"[" * depth_over_any_parser + b"]" * depth_over_any_parser + b"}",
        b'{"input": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_000 + b"}",
        b'{"type": "sleep", "input": {"seconds": ' + b"[" * 500 + b"]" * 500 + b"}}",
        json.dumps({"type": "sleep", "input": {"seconds": 0}, "webhookEvents": [[[[["completed"]]]]]}).encode(),
        b"[" * 100_000,  # unterminated
    ]
    soft = Soft()
    for path in ("/api/generate", "/api/train", "/api/tokens"):
        for body in bodies:
            with soft.case((path, body[:60])):
                status, err, _ = await api.call("POST", path, data=body, headers={"Content-Type": "application/json"})
                assert_error(status, err, {400, 422}, {"BAD_REQUEST", "VALIDATION_ERROR"})
    soft.check()
    assert await state(api) == before
    alive(stack)


# ---- numbers -----------------------------------------------------------------------------------


HUGE = ["101", "1000000", str(2**31), str(2**63), str(10**30), "1e309", "-1", "0", "NaN", "Infinity", "5.5", "0x10", ""]


async def test_huge_and_odd_limits_are_422(api: Api):
    soft = Soft()
    for path in ("/api/jobs", "/api/me/ledger"):
        for value in HUGE:
            with soft.case((path, value)):
                status, err, _ = await api.call("GET", path, params={"limit": value})
                assert_error(status, err, 422, "VALIDATION_ERROR")
                assert [d["field"] for d in err["error"]["details"]] == ["limit"], err
        status, ok, _ = await api.call("GET", path, params={"limit": "100"})
        assert status == 200, ok
    soft.check()


@pytest.mark.parametrize("seq", [2**31, 2**53 + 1, 2**63, 10**30])
async def test_sequence_numbers_beyond_any_job_are_not_server_errors(stack: Stack, api: Api, seq: int):
    """`after`, `afterSeq`, `since` have no documented maximum: a number past every event answers
    like one just past the last (nothing newer), or 422; never 5xx, never a hung stream."""
    job = await api.submit("generate", {"seconds": 0, "ticks": 1}, type="sleep")
    job_id = (await api.wait(job["jobId"]))["jobId"]
    soft = Soft()
    with soft.case("events?after"):
        status, body, _ = await api.call("GET", f"/api/jobs/{job_id}/events", params={"after": str(seq)})
        if status != 422:
            assert (status, body) == (200, {"events": []})
        assert_error(status, body, 422, "VALIDATION_ERROR") if status == 422 else None
    with soft.case("afterSeq"):
        params = {"afterSeq": str(seq), "waitSeconds": "0.2"}
        status, body, _ = await api.call("GET", f"/api/jobs/{job_id}", params=params)
        if status != 200:
            assert_error(status, body, 422, "VALIDATION_ERROR")
    for label, query, headers in (
        ("stream?since", f"?since={seq}", []),
        ("Last-Event-ID", "", [(b"Last-Event-ID", str(seq)[:12].encode())]),
    ):
        with soft.case(label):
            try:
                r = await raw(
                    stack, "GET", f"/api/jobs/{job_id}/stream{query}", [bearer(api.key), *headers], timeout_s=10
                )
            except (TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                raise AssertionError(f"the stream broke or hung: {exc!r}") from exc
            if r.status == 200:
                text = r.body.decode()
                assert text.startswith("event: snapshot\n") and text.endswith("\n\n"), text[-300:]
                assert "\nid: " not in text and '"error"' not in text.split("\n\n", 1)[1], text[-300:]
            else:
                assert_raw_error(r, {400, 422}, {"BAD_REQUEST", "VALIDATION_ERROR"})
    soft.check()
    alive(stack)


async def test_ledger_cursor_at_its_documented_maximum(api: Api):
    """The ledger cursor is documented as 1-9 digits; the largest is a valid cursor."""
    status, body, _ = await api.call("GET", "/api/me/ledger", params={"cursor": "9" * 9})
    assert status == 200, body
    status, body, _ = await api.call("GET", "/api/me/ledger", params={"cursor": "9" * 10})
    assert_error(status, body, 422, "VALIDATION_ERROR")


async def test_nul_and_control_characters_in_ids_and_filters(stack: Stack, api: Api):
    before = await state(api)
    soft = Soft()
    for path in ("/api/jobs/%00", "/api/jobs/a%00b", "/api/jobs/%0d%0aX-Injected:%201", "/api/jobs/%ff%fe"):
        for method in ("GET", "DELETE"):
            with soft.case((method, path)):
                r = await raw(stack, method, path, [bearer(api.key)])
                assert_raw_error(r, 404, "NOT_FOUND")
                assert "x-injected" not in r.headers
    for value in ("\x00", "a\x00b", "\x1b[31m", "\ufffe"):
        with soft.case(("type filter", value)):
            status, body, _ = await api.call("GET", "/api/jobs", params={"type": value})
            if status == 200:
                assert body == {"jobs": [], "nextCursor": None}
            else:
                assert_error(status, body, 422, "VALIDATION_ERROR")
        with soft.case(("token jobIds", value)):
            status, body, _ = await api.call("POST", "/api/tokens", json={"jobIds": [value]})
            assert_error(status, body, {404, 422}, {"NOT_FOUND", "VALIDATION_ERROR"})
    soft.check()
    assert await state(api) == before


# ---- unicode -----------------------------------------------------------------------------------


async def test_unicode_in_names_types_and_prompts(api: Api):
    before = await state(api)
    soft = Soft()
    for name in ("名前", "ñame", "a b", "\uff11\uff12\uff13", "e\u0301", "a\u200bb", "x\u202egnp.exe", "🦊", "a\x00"):
        with soft.case(name):
            status, err, _ = await api.call("POST", "/api/train", json={"input": {"name": name, "steps": 1}})
            assert_error(status, err, 422, "VALIDATION_ERROR")
            assert "input.name" in {d["field"] for d in err["error"]["details"]}, err
    soft.check()
    for type_ in ("ímage", "image\x00", "IMAGE", "\uff49\uff4d\uff41\uff47\uff45"):
        status, err, _ = await api.call("POST", "/api/generate", json={"type": type_, "input": {"prompt": "x"}})
        assert_error(status, err, 422, "VALIDATION_ERROR")
    status, err, _ = await api.call("POST", "/api/generate", json={"input": {"prompt": "🦊" * 2001, "steps": 1}})
    assert_error(status, err, 422, "VALIDATION_ERROR")
    # a lone surrogate is not valid JSON text (RFC 8259 8.2: unpredictable), so refuse it
    lone = b'{"input": {"prompt": "\\ud800", "steps": 1, "width": 64, "height": 64}}'
    status, err, _ = await api.call("POST", "/api/generate", data=lone, headers={"Content-Type": "application/json"})
    assert_error(status, err, {400, 422}, {"BAD_REQUEST", "VALIDATION_ERROR"})
    assert await state(api) == before

    for prompt in (
        "un renard roux 🦊 雪の中",
        "مرحبا بالعالم \u202eevil\u202c",
        "Z\u0351\u0360\u035b\u0361a\u0352l\u0362go",
        "🦊" * 2000,
        'tab\tnew\nline \\ "quoted" </script>',
    ):
        job = await api.submit("generate", {"prompt": prompt, "width": 64, "height": 64, "steps": 1})
        assert job["input"]["prompt"] == prompt
        status, again, _ = await api.call("GET", f"/api/jobs/{job['jobId']}")
        assert status == 200 and again["input"]["prompt"] == prompt


async def test_a_unicode_idempotency_key_replays(stack: Stack, api: Api):
    key = "ключ-🔑-clé".encode()
    body = json.dumps({"type": "sleep", "input": {"seconds": 0, "ticks": 0}}).encode()
    headers = [bearer(api.key), JSON, (b"Idempotency-Key", key), (b"Content-Length", str(len(body)).encode())]
    first = await raw(stack, "POST", "/api/generate", headers, [body])
    assert first.status == 202, first.body[:300]
    credits = (await state(api))[0]
    second = await raw(stack, "POST", "/api/generate", headers, [body])
    assert second.status == 202, second.body[:300]
    assert second.json()["jobId"] == first.json()["jobId"]
    assert second.headers.get("idempotent-replayed") == "true"
    assert (await state(api))[0] == credits


async def test_header_injection_in_idempotency_key_is_refused(stack: Stack, api: Api):
    before = await state(api)
    body = json.dumps({"type": "sleep", "input": {"seconds": 0, "ticks": 0}}).encode()
    length = (b"Content-Length", str(len(body)).encode())
    soft = Soft()
    # legal header bytes, but not a printable key
    for key in (b"a\tb", "a\u200bb".encode(), "\u202ekey".encode(), b"\xff\xfe", "\u0085".encode(), b"x" * 256):
        with soft.case(key):
            headers = [bearer(api.key), JSON, (b"Idempotency-Key", key), length]
            assert_raw_error(await raw(stack, "POST", "/api/generate", headers, [body]), 422, "VALIDATION_ERROR")
    # control characters (CR, LF, NUL, DEL, ...) are not legal in a header at all (RFC 9110 5.5):
    # the request is malformed and refused as such, and nothing is injected
    for key in (b"a\rX-Injected: 1", b"a\nX-Injected: 1", b"a\x00b", b"\x01", b"a\x7fb"):
        with soft.case(key):
            headers = [bearer(api.key), JSON, (b"Idempotency-Key", key), length]
            r = await raw(stack, "POST", "/api/generate", headers, [body])
            assert r.status in (400, 422), (r.status, r.body[:300])
            assert "x-injected" not in r.headers
    soft.check()
    assert await state(api) == before
    # a refused key left nothing behind: the same key with a good request works
    r = await raw(
        stack, "POST", "/api/generate", [bearer(api.key), JSON, (b"Idempotency-Key", b"x" * 255), length], [body]
    )
    assert r.status == 202, r.body[:300]


# ---- credentials -------------------------------------------------------------------------------


async def test_odd_api_keys_are_401(stack: Stack, api: Api, http: aiohttp.ClientSession):
    valid = api.key.encode()
    odd = [
        b"ok_" + b"A" * 43,
        valid[:-1] + (b"A" if valid[-1:] != b"A" else b"B"),
        valid + b"x",
        valid.upper(),
        b"ok_' OR '1'='1",
        b"ok_%00",
        b"ok_../../etc/passwd",
        "ok_ключ".encode(),
        "ok_\u202e".encode(),
        b"ok_\xff",
        valid + b"\xff",
        b"\xc3\x28",
        b"st_" + b"A" * 40,
        b"x" * 7000,
    ]
    soft = Soft()
    for key in odd:
        with soft.case(key[:60]):
            r = await raw(stack, "GET", "/api/me", [bearer(key)])
            assert_raw_error(r, 401, "UNAUTHORIZED")
            assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
            r = await raw(stack, "POST", "/api/generate", [bearer(key), JSON, (b"Content-Length", b"2")], [b"{}"])
            assert_raw_error(r, 401, "UNAUTHORIZED")
            r = await raw(stack, "GET", "/ws", [bearer(key), *WS_UPGRADE])
            assert_raw_error(r, 401, "UNAUTHORIZED")
    for header in (b"Basic " + valid, b"Bearer", b"Bearer ", b"Token " + valid, b"Bearer\t\t" + b"x"):
        with soft.case(header[:60]):
            assert_raw_error(await raw(stack, "GET", "/api/me", [(b"Authorization", header)]), 401, "UNAUTHORIZED")
    soft.check()
    alive(stack)


async def _token(api: Api, **body: Any) -> str:
    status, out, _ = await api.call("POST", "/api/tokens", json=body)
    assert status == 201, out
    assert out["token"].startswith(TOKEN_PREFIX)
    return str(out["token"])


async def _stream_status(stack: Stack, job_id: str, token: str) -> Raw:
    return await raw(stack, "GET", f"/api/jobs/{job_id}/stream?token={quote(token, safe='')}", timeout_s=10)


async def _ws_refused(stack: Stack, http: aiohttp.ClientSession, token: str) -> int:
    try:
        ws = await http.ws_connect(stack.url + "/ws", params={"token": token})
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


@pytest.fixture
async def finished_job(api: Api) -> str:
    job = await api.submit("generate", {"seconds": 0, "ticks": 1}, type="sleep")
    return str((await api.wait(job["jobId"]))["jobId"])


async def test_expired_subscribe_tokens_are_401(stack: Stack, api: Api, http: aiohttp.ClientSession, finished_job: str):
    token = await _token(api, ttlSeconds=1)
    assert (await _stream_status(stack, finished_job, token)).status == 200  # good while it lasts
    await asyncio.sleep(2.2)
    assert_raw_error(await _stream_status(stack, finished_job, token), 401, "UNAUTHORIZED")
    assert await _ws_refused(stack, http, token) == 401


async def test_forged_subscribe_tokens_are_401(
    stack: Stack, api: Api, http: aiohttp.ClientSession, user: Any, finished_job: str
):
    token = await _token(api)
    assert (await _stream_status(stack, finished_job, token)).status == 200
    body = token[len(TOKEN_PREFIX) :]
    payload, _, signature = body.rpartition(".")

    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

    def flip(s: str, i: int) -> str:
        """Change the character at i to one that differs in its high bits (a base64 character's
        low bits may be padding, and flipping those would not change the decoded bytes)."""
        return s[:i] + alphabet[alphabet.index(s[i]) ^ 32] + s[i + 1 :]

    forged = [
        TOKEN_PREFIX + flip(body, 0),
        TOKEN_PREFIX + flip(body, len(payload) // 2),
        TOKEN_PREFIX + flip(body, len(payload) + 1),
        TOKEN_PREFIX + flip(body, len(payload) + 1 + len(signature) // 2),
        TOKEN_PREFIX + payload + "." + signature[::-1],
        TOKEN_PREFIX + payload,
        TOKEN_PREFIX + payload + ".",
        token[:-3],
        token + "A",
        Tokens("another-server's-secret").issue(user.user_id, None, 600)[0],
        "xx_" + body,
        "ST_" + body,
        body,
        TOKEN_PREFIX,
        TOKEN_PREFIX + "A" * 4093,  # the schema's longest
        TOKEN_PREFIX + "é" * 10,
        # right secret, a user that does not exist
        Tokens(stack.env["ORCH_SECRET_KEY"]).issue("no-such-user", None, 600)[0],
    ]
    soft = Soft()
    for bad in forged:
        with soft.case(bad[:80]):
            assert_raw_error(await _stream_status(stack, finished_job, bad), 401, "UNAUTHORIZED")
            assert await _ws_refused(stack, http, bad) == 401
            r = await raw(stack, "GET", f"/api/jobs/{finished_job}/stream", [bearer(bad)])
            assert_raw_error(r, 401, "UNAUTHORIZED")
    soft.check()
    alive(stack)


async def test_a_subscribe_token_reads_only_its_jobs(
    stack: Stack, api: Api, http: aiohttp.ClientSession, finished_job: str
):
    other = await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    await api.wait(other["jobId"])
    token = await _token(api, jobIds=[finished_job])
    before = await state(api)
    assert (await _stream_status(stack, finished_job, token)).status == 200
    assert_raw_error(await _stream_status(stack, other["jobId"], token), 404, "NOT_FOUND")
    async with http.ws_connect(stack.url + "/ws", params={"token": token}) as ws:
        await ws.send_json({"type": "subscribe", "jobId": other["jobId"]})
        reply = await ws.receive_json(timeout=10)
        assert reply["type"] == "error" and reply["code"] == "NOT_FOUND", reply
    for method, path, body in (
        ("GET", "/api/me", None),
        ("GET", "/api/jobs", None),
        ("GET", f"/api/jobs/{finished_job}", None),
        ("POST", "/api/generate", {"type": "sleep", "input": {}}),
        ("POST", "/api/tokens", {}),
        ("DELETE", f"/api/jobs/{finished_job}", None),
    ):
        headers = [bearer(token), JSON]
        data = json.dumps(body).encode() if body is not None else b""
        r = await raw(stack, method, path, [*headers, (b"Content-Length", str(len(data)).encode())], [data])
        assert_raw_error(r, {401, 403}, {"UNAUTHORIZED", "FORBIDDEN"})
    assert await state(api) == before


async def test_a_last_event_id_that_is_not_a_number_is_400(stack: Stack, api: Api, finished_job: str):
    soft = Soft()
    for value in ("abc", "-1", "1e3", "9" * 13, "²", "1 2", "0x1"):
        with soft.case(value):
            headers = [bearer(api.key), (b"Last-Event-ID", value.encode())]
            r = await raw(stack, "GET", f"/api/jobs/{finished_job}/stream", headers)
            assert_raw_error(r, 400, "BAD_REQUEST")
    soft.check()


async def test_a_long_subscribe_token_within_the_schema_gets_the_error_shape(stack: Stack, finished_job: str):
    """The schema allows a 4096-character `token`; percent-encoded non-ASCII that is ~36 kB of
    request line. It must be answered like any bad token (401 in the contract's shape)."""
    token = TOKEN_PREFIX + "é" * 4093
    r = await _stream_status(stack, finished_job, token)
    assert_raw_error(r, 401, "UNAUTHORIZED")
    alive(stack)


# ---- paths -------------------------------------------------------------------------------------


async def test_path_traversal_in_artifact_urls_is_404(stack: Stack, api: Api):
    job = await api.submit("generate", {"prompt": "a fox", "width": 64, "height": 64, "steps": 1})
    job = await api.wait(job["jobId"], timeout_s=90)
    assert job["status"] == "completed", job
    url = job["result"]["artifacts"][0]["url"]
    ok = await raw(stack, "GET", url)
    assert ok.status == 200 and ok.body.startswith(b"\x89PNG"), ok.status
    _, job_id, token, name = url.split("/", 4)[1:]

    def flip(s: str) -> str:
        return s[:-1] + ("A" if s[-1] != "A" else "B")

    attempts = [
        "/artifacts/../../etc/passwd",
        "/artifacts/%2e%2e/%2e%2e/etc/passwd",
        "/artifacts/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/artifacts/..%2f..%2f..%2fetc%2fpasswd",
        "/artifacts/%252e%252e/%252e%252e/etc/passwd",
        "/artifacts/..%5c..%5c..%5cetc%5cpasswd",
        "/artifacts/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
        "/artifacts/x/y/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        f"/artifacts/{job_id}/{token}/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        f"/artifacts/{job_id}/{token}/..%2f{token}%2f{name}",
        f"/artifacts/{job_id}/{token}/%2e%2e",
        f"/artifacts/{job_id}/{token}/.{name}.tmp",
        f"/artifacts/{job_id}/{token}/{name}%00.txt",
        f"/artifacts/{job_id}/{token}/{name}/",
        f"/artifacts/{job_id}/{token}/%2Fetc%2Fpasswd",
        f"/artifacts/{job_id}/..%2f{job_id}/{name}",
        f"/artifacts/{job_id}/{flip(token)}/{name}",
        f"/artifacts/{flip(job_id)}/{token}/{name}",
        f"/artifacts/{job_id}/{token}/..",
        f"/artifacts/%2e%2e/{token}/{name}",
        f"/artifacts/{job_id}/%2e%2e/{name}",
        "/artifacts/..%252f..%252f..%252fetc%252fpasswd/a/b",
    ]
    soft = Soft()
    for path in attempts:
        with soft.case(path):
            r = await raw(stack, "GET", path)
            assert r.status == 404, (r.status, r.body[:100])
            assert_raw_error(r, 404, "NOT_FOUND")
    for path in ("/static/../orchestrator/app.py", "/static/%2e%2e/app.py", "/static/..%2f..%2fpyproject.toml"):
        with soft.case(path):
            r = await raw(stack, "GET", path)
            assert r.status in (403, 404), (r.status, r.body[:100])
            assert_raw_error(r, {403, 404})
    soft.check()


# ---- webhooks ----------------------------------------------------------------------------------

INSIDE = [
    # loopback, in every spelling
    "http://127.0.0.1/hook",
    "https://127.0.0.1:8443/hook",
    "http://127.1/",
    "http://0177.0.0.1/",
    "http://0x7f000001/",
    "http://2130706433/",
    "http://localhost/",
    "http://LOCALHOST:8080/",
    "http://[::1]/",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://①②⑦.0.0.1/",
    "http://0.0.0.0/",
    "http://0/",
    "http://[::]/",
    # private
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://172.31.255.255/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://[fd00::1]/",
    "http://[fc00::1]/",
    # link-local and cloud metadata
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.170.2/v2/credentials",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://100.100.100.200/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    # other non-public
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
    "http://192.0.2.1/",
    "http://198.18.0.1/",
    "http://[64:ff9b::7f00:1]/",
    "http://[::127.0.0.1]/",
    # credentials in the URL, and the classic '@' confusion
    "http://user:pass@93.184.216.34/",
    "http://93.184.216.34@127.0.0.1/",
    "http://does-not-resolve.invalid/",
]


async def test_webhook_urls_aimed_inside_are_refused_at_submit(stack: Stack, api: Api):
    before = await state(api)
    soft = Soft()
    for url in INSIDE:
        for queue, body in (
            ("generate", {"type": "sleep", "input": {"seconds": 0}, "webhookUrl": url}),
            ("train", {"input": {"name": "x", "steps": 1}, "webhookUrl": url, "webhookEvents": ["completed"]}),
        ):
            with soft.case((queue, url)):
                status, err, _ = await api.call("POST", f"/api/{queue}", json=body, headers={"Idempotency-Key": "ssrf"})
                assert_error(status, err, 422, "WEBHOOK_URL_FORBIDDEN")
    soft.check()
    assert await state(api) == before
    # the guard tells inside from outside: a public address is taken (for an event this job
    # never reaches, so nothing is ever sent off this machine)
    job = await api.submit(
        "generate",
        {"seconds": 0, "ticks": 0},
        type="sleep",
        webhookUrl="http://93.184.216.34:9/hook",
        webhookEvents=["timed_out"],
    )
    assert job["webhookUrl"] == "http://93.184.216.34:9/hook"
    # and the refused attempts left no idempotency record behind
    status, again, _ = await api.call(
        "POST", "/api/generate", json={"type": "sleep", "input": {"seconds": 0}}, headers={"Idempotency-Key": "ssrf"}
    )
    assert status == 202, again


BROKE_THE_PARSER = [
    "http://a..b/",  # an empty label: UnicodeError from the idna codec in getaddrinfo
    "http://" + "a" * 70 + ".com/",  # a label over 63 characters: the same
    "http://[::1",  # ValueError from urlsplit
    "http://[127.0.0.1]/",  # ValueError from urlsplit: IPv4 in brackets
]


async def test_webhook_urls_that_once_broke_the_parser_are_422(stack: Stack, api: Api):
    before = await state(api)
    soft = Soft()
    for url in BROKE_THE_PARSER:
        with soft.case(url):
            body = {"type": "sleep", "input": {"seconds": 0}, "webhookUrl": url}
            status, err, _ = await api.call("POST", "/api/generate", json=body)
            assert_error(status, err, 422, {"VALIDATION_ERROR", "WEBHOOK_URL_FORBIDDEN"})
    soft.check()
    assert await state(api) == before
    alive(stack)


async def test_malformed_webhook_urls_are_422_even_when_private_addresses_are_allowed():
    for url in ("http://[::1", "http://[127.0.0.1]/", "http://[::1]:99999/", "ftp://example.com/"):
        with pytest.raises(ValidationFailed) as caught:
            await check_url(url, allow_private=True)
        assert caught.value.status == 422 and caught.value.code == "VALIDATION_ERROR", url


def _verdict(url: str, allow_private: bool) -> str:
    """What check_url answers: "ok" or the 422 code; anything else it raises fails the test."""
    try:
        asyncio.run(check_url(url, allow_private))
    except ValidationFailed as exc:
        assert exc.status == 422, exc
        return exc.code
    return "ok"


PIECES = st.one_of(
    st.characters(codec="utf-8"),
    st.just("\udcff"),
    st.sampled_from([*":/[]@%.?#\\\x00 -_", "xn--", "::", "%25", "[::1]", "127.0.0.1", "..", "\u3002"]),
)
"""Pieces parsers trip on: separators, brackets, NUL, a lone surrogate, punycode, ideographic dot."""


def texts(max_pieces: int) -> st.SearchStrategy[str]:
    return st.lists(PIECES, max_size=max_pieces).map("".join)


SCHEMES = st.sampled_from(["http://", "https://", "HTTP://", "http:", "http:///", "ftp://", ""])
ANY_URL = st.one_of(texts(60), st.builds(lambda a, b, c: a + b + c, SCHEMES, texts(40), texts(20)))
"""Arbitrary strings, and scheme + host-ish + tail built from those pieces."""
IP_HOSTS = st.one_of(
    st.ip_addresses().map(lambda ip: f"[{ip}]" if ip.version == 6 else str(ip)),
    st.integers(0, 2**32 - 1).map(str),
)
BAD_LABELS = st.one_of(
    st.text(st.sampled_from("ab-"), min_size=64, max_size=100),
    st.just(""),
    st.text(st.sampled_from("ab."), max_size=10).map(lambda t: t + ".."),
)
NO_LOOKUP_HOSTS = st.one_of(IP_HOSTS, st.builds(lambda a, b: a + "." + b + ".invalid", BAD_LABELS, BAD_LABELS))
"""Hosts refused or judged before any DNS query: IP literals and names the idna codec rejects."""


@hypothesis.settings(max_examples=400, deadline=None, database=None, derandomize=True)
@hypothesis.given(ANY_URL)
def test_check_url_answers_a_verdict_or_422_for_any_string_when_private_is_allowed(url: str):
    """With private addresses allowed nothing is resolved: this is the syntax check alone."""
    assert _verdict(url, allow_private=True) in {"ok", "VALIDATION_ERROR", "WEBHOOK_URL_FORBIDDEN"}


@hypothesis.settings(max_examples=300, deadline=None, database=None, derandomize=True)
@hypothesis.given(
    SCHEMES, NO_LOOKUP_HOSTS, st.one_of(st.just(""), st.integers(-5, 70000).map(lambda p: f":{p}")), texts(20)
)
def test_check_url_answers_a_verdict_or_422_for_hosts_that_need_no_lookup(scheme: str, host: str, port: str, tail: str):
    verdict = _verdict(scheme + host + port + "/" + tail, allow_private=False)
    assert verdict in {"ok", "VALIDATION_ERROR", "WEBHOOK_URL_FORBIDDEN"}


# ---- error bodies --------------------------------------------------------------------------------


async def test_a_body_of_70000_unknown_keys_gets_a_small_422(stack: Stack, api: Api):
    before = await state(api)
    body = {"type": "sleep", "input": {f"k{i}": 0 for i in range(70_000)}}
    raw_body = json.dumps(body).encode()
    assert len(raw_body) <= LIMIT
    length = (b"Content-Length", str(len(raw_body)).encode())
    r = await raw(stack, "POST", "/api/generate", [bearer(api.key), JSON, length], [raw_body])
    assert_raw_error(r, 422, "VALIDATION_ERROR")
    assert len(r.body) < 64 * 1024, len(r.body)
    details = r.json()["error"]["details"]
    assert len(details) == MAX_FIELD_ERRORS + 1, len(details)
    assert details[0]["field"].startswith("input.k") and "70000 more" not in details[0]["message"]
    assert details[-1]["field"] == "(more)" and details[-1]["message"].startswith(str(70_000 - MAX_FIELD_ERRORS))
    assert await state(api) == before


async def test_a_long_unknown_key_is_clipped_in_the_422(stack: Stack, api: Api):
    key = "k" * 500_000
    status, err, _ = await api.call("POST", "/api/generate", json={"type": "sleep", "input": {key: 0}})
    assert_error(status, err, 422, "VALIDATION_ERROR")
    assert len(json.dumps(err)) < 4096, len(json.dumps(err))


# ---- redelivery ----------------------------------------------------------------------------------


async def test_redeliver_is_rate_limited_per_user(stack: Stack, api: Api, http: aiohttp.ClientSession):
    """ORCH_REDELIVER_RATE is 5/minute here: each call counts (even for an unknown delivery),
    the sixth is 429 with Retry-After, and another user is not held back."""
    job = await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    path = f"/api/jobs/{job['jobId']}/deliveries/msg_nothing/redeliver"
    for _ in range(5):
        status, err, _ = await api.call("POST", path)
        assert_error(status, err, 404, "NOT_FOUND")
    status, err, headers = await api.call("POST", path)
    assert_error(status, err, 429, "RATE_LIMITED")
    assert 1 <= int(headers["Retry-After"]) <= 60
    other = Api(http, stack.url, (await stack.user(credits=10)).api_key)
    other_job = await other.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    status, err, _ = await other.call("POST", f"/api/jobs/{other_job['jobId']}/deliveries/msg_nothing/redeliver")
    assert_error(status, err, 404, "NOT_FOUND")


# ---- the command line and the data dir -----------------------------------------------------------


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_a_negative_zero_or_huge_top_up_is_refused_with_exit_2(stack: Stack, http: aiohttp.ClientSession):
    user = await stack.user(credits=50)
    api = Api(http, stack.url, user.api_key)
    before = await state(api)
    soft = Soft()
    for amount in ("-1000", "0", "1" * 20, str(10**12 + 1), "abc", "1e3", "9" * 5000):
        with soft.case(amount):
            done = cli(stack.env, "users", "credit", user.name, amount)
            assert done.returncode == 2, (done.returncode, done.stdout, done.stderr[-500:])
            assert "credits must be" in done.stderr or "whole number" in done.stderr, done.stderr[-500:]
            assert "Traceback" not in done.stderr, done.stderr[-500:]
    soft.check()
    assert await state(api) == before
    for amount in (-1000, 0, 10**20):
        with pytest.raises(ValidationFailed):
            await accounts.add_credits(stack.db(), user.name, amount)
    assert await state(api) == before
    done = cli(stack.env, "users", "credit", user.name, "25")
    assert done.returncode == 0, done.stderr
    status, me, _ = await api.call("GET", "/api/me")
    assert status == 200 and me["credits"] == 75
    status, ledger, _ = await api.call("GET", "/api/me/ledger")
    assert status == 200 and sum(e["delta"] for e in ledger["entries"]) == 75


def test_data_dir_key_and_database_are_private_and_webhook_secrets_sealed(tmp_path: Path):
    """A fresh data dir is 0700, secret.key and the SQLite file 0600; the webhook secret printed
    once is not what the database holds (nor anywhere in its files)."""
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ORCH_SECRET_KEY", "REDIS_URL")}
    env["ORCH_DATA_DIR"] = str(data)
    done = cli(env, "users", "create", "alice", "--credits", "5", "--json")
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    assert created["webhookSecret"].startswith("whsec_")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("secret.key", "orchestrator.db"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    with sqlite3.connect(data / "orchestrator.db") as conn:
        (stored,) = conn.execute("SELECT webhook_secret FROM users WHERE name = 'alice'").fetchone()
    assert stored.startswith("enc1:") and created["webhookSecret"] not in stored
    for f in data.iterdir():
        if f.is_file():
            assert created["webhookSecret"].encode() not in f.read_bytes(), f


async def test_the_process_survived_all_of_it(stack: Stack):
    alive(stack)
