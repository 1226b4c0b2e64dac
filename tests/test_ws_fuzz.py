"""Hypothesis over the WebSocket message parser (issue 5, hostile input), on real sockets to /ws.

Every fuzzed frame gets the contract's answer (`pong`, `subscribed` then the events after `since`,
`unsubscribed`, or an `error` with an UPPER_SNAKE code, the socket staying open), or, for frames
that break the WebSocket protocol itself (invalid UTF-8 in a text frame, over the message size),
a protocol close of that socket only. A neighbour socket keeps answering pings throughout and the
API process stays up.

The tests are sync: hypothesis drives them, and each example runs on a private event loop."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import hypothesis
import pytest
from hypothesis import strategies as st
from support import Api, Stack

MAX_EXAMPLES = 200
REPLY_TIMEOUT_S = 10.0
WS_MAX_MESSAGE_BYTES = 16 * 1024
EVENT_TYPES = {"status", "progress", "log"}
SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


@dataclass
class World:
    """A user with finished jobs (their stored events known) and two sockets."""

    stack: Stack
    http: aiohttp.ClientSession
    api: Api
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fuzz: aiohttp.ClientWebSocketResponse | None = None
    neighbour: aiohttp.ClientWebSocketResponse | None = None
    closes: list[int] = field(default_factory=list)

    async def connect(self, query: str = "") -> aiohttp.ClientWebSocketResponse:
        return await self.http.ws_connect(
            self.stack.url + "/ws" + query, headers=self.api.headers(), autoping=True, max_msg_size=0
        )

    async def fuzz_socket(self) -> aiohttp.ClientWebSocketResponse:
        if self.fuzz is None or self.fuzz.closed:
            self.fuzz = await self.connect()
        return self.fuzz

    async def drop_fuzz_socket(self) -> None:
        if self.fuzz is not None:
            await self.fuzz.close()
            self.fuzz = None

    async def close(self) -> None:
        for ws in (self.fuzz, self.neighbour):
            if ws is not None:
                await ws.close()
        await self.http.close()


async def make_world(stack: Stack) -> World:
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    world = World(stack, http, api)
    done = await api.submit("generate", {"seconds": 0, "ticks": 3}, type="sleep")
    failed = await api.submit("generate", {"seconds": 0, "ticks": 1, "fail": True}, type="sleep")
    for job in (done, failed):
        await api.wait(job["jobId"])
        world.events[job["jobId"]] = await api.events(job["jobId"])
        assert world.events[job["jobId"]], job
    world.neighbour = await world.connect(f"?jobId={done['jobId']}")
    first = await world.neighbour.receive_json(timeout=REPLY_TIMEOUT_S)
    assert first["type"] == "subscribed"
    for ev in world.events[done["jobId"]]:
        assert (await world.neighbour.receive_json(timeout=REPLY_TIMEOUT_S))["seq"] == ev["seq"]
    return world


# ---- what the contract allows as an answer -------------------------------------------------------


@dataclass
class Allowed:
    """The answers a frame may get: error codes, or a `subscribed` (with the events after
    `since`), `unsubscribed` or `pong`; `close` lists protocol close codes allowed instead."""

    errors: set[str] = field(default_factory=set)
    subscribed: tuple[str, float] | None = None  # (jobId, since)
    unsubscribed: str | None = None
    pong: bool = False
    close: set[int] = field(default_factory=set)
    job_id: Any = None  # what an error's jobId must be, if it carries one
    silent: bool = False  # may be ignored without a reply


def _loads(text: str) -> tuple[bool, Any]:
    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        return True, json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError):
        return False, None


def allowed_for(frame: Frame, real: set[str]) -> Allowed:
    allowed = _allowed_for(frame, real)
    if frame.kind == "text" and re.search(r"\\ud[89a-f][0-9a-f]{2}", frame.data, re.IGNORECASE):
        allowed.errors.add("BAD_REQUEST")  # a lone surrogate escape: RFC 8259 8.2, refusing it is fine
    return allowed


def _allowed_for(frame: Frame, real: set[str]) -> Allowed:
    if frame.kind == "binary":
        return Allowed(errors={"BAD_REQUEST"}, silent=True)  # "JSON text frames": an error, or ignored
    if frame.kind == "bad-utf8":
        return Allowed(close={1007})  # RFC 6455 8.1: fail the connection (that one only)
    size = len(frame.data.encode("utf-8", "surrogatepass"))
    big = {1009} if size > WS_MAX_MESSAGE_BYTES else set()
    ok, msg = _loads(frame.data)
    if not ok or not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        return Allowed(errors={"BAD_REQUEST"}, close=big)
    kind, job_id = msg["type"], msg.get("jobId")
    if kind == "ping":
        return Allowed(pong=True, close=big)
    if kind not in ("subscribe", "unsubscribe") or not isinstance(job_id, str) or not job_id:
        return Allowed(errors={"BAD_REQUEST"}, close=big, job_id=job_id)
    if kind == "unsubscribe":
        return Allowed(unsubscribed=job_id, errors={"BAD_REQUEST"} if len(job_id) > 64 else set(), close=big)
    since = msg.get("since", 0)
    since = 0 if since is None else since
    valid_since = not isinstance(since, bool) and isinstance(since, int) and since >= 0
    integral = isinstance(since, float) and math.isfinite(since) and since >= 0 and since == int(since)
    if job_id not in real:
        # unknown: NOT_FOUND, or BAD_REQUEST when something else in it is malformed or out of range
        refusable = not valid_since or since >= 2**31 or len(job_id) > 64
        errors = {"NOT_FOUND"} | ({"BAD_REQUEST"} if refusable else set())
        return Allowed(errors=errors, close=big, job_id=job_id)
    if valid_since or integral:
        # a server may refuse a `since` beyond its sequence range, never fail on it
        errors = {"BAD_REQUEST"} if since >= 2**31 or integral else set()
        return Allowed(subscribed=(job_id, since), errors=errors, close=big, job_id=job_id)
    return Allowed(errors={"BAD_REQUEST"}, close=big, job_id=job_id)


class Frame:
    def __init__(self, kind: str, data: Any) -> None:
        self.kind = kind  # text, binary, bad-utf8
        self.data = data

    def __repr__(self) -> str:
        return f"Frame({self.kind}, {self.data!r:.300})"


async def send(ws: aiohttp.ClientWebSocketResponse, frame: Frame) -> None:
    if frame.kind == "text":
        await ws.send_str(frame.data)
    elif frame.kind == "binary":
        await ws.send_bytes(frame.data)
    else:
        await ws.send_frame(frame.data, aiohttp.WSMsgType.TEXT)


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any] | int:
    """The next JSON message, or the close code if the socket closed."""
    msg = await ws.receive(timeout=REPLY_TIMEOUT_S)
    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
        return ws.close_code if ws.close_code is not None else -1
    assert msg.type == aiohttp.WSMsgType.TEXT, f"server sent {msg.type}: {msg.data!r:.200}"
    data = json.loads(msg.data)
    assert isinstance(data, dict) and isinstance(data.get("type"), str), data
    return data


def check_error(reply: dict[str, Any], allowed: Allowed) -> None:
    assert set(reply) <= {"type", "code", "message", "jobId"}, reply
    assert re.fullmatch(r"[A-Z][A-Z0-9_]*", reply.get("code", "")), reply
    assert isinstance(reply.get("message"), str) and reply["message"], reply
    assert reply["code"] in allowed.errors, reply
    if "jobId" in reply:
        assert isinstance(reply["jobId"], str) and reply["jobId"] == allowed.job_id, reply


async def exchange(world: World, frame: Frame) -> None:
    """Send one fuzzed frame then a ping; check everything the server says up to the pong."""
    allowed = allowed_for(frame, set(world.events))
    ws = await world.fuzz_socket()
    await send(ws, frame)
    if not ws.closed:
        await ws.send_str('{"type": "ping"}')
    first = await receive(ws)
    if isinstance(first, int):
        assert first in allowed.close, f"socket closed with {first} after {frame!r}"
        world.closes.append(first)
        return
    replies = [first]
    if first["type"] == "subscribed":
        assert allowed.subscribed is not None, (frame, first)
        job_id, since = allowed.subscribed
        assert first["jobId"] == job_id and first["job"]["jobId"] == job_id, first
        for ev in [e for e in world.events[job_id] if e["seq"] > since]:
            got = await receive(ws)
            assert isinstance(got, dict) and got["type"] in EVENT_TYPES, (frame, got)
            assert (got["jobId"], got["seq"]) == (job_id, ev["seq"]), (frame, got, ev)
        replies.append(await receive(ws))
    elif first["type"] == "error":
        check_error(first, allowed)
        replies.append(await receive(ws))
    elif first["type"] == "unsubscribed":
        assert first == {"type": "unsubscribed", "jobId": allowed.unsubscribed}, (frame, first)
        replies.append(await receive(ws))
    elif first["type"] == "pong":
        if allowed.pong:  # the fuzzed ping's pong; the next one answers ours
            replies.append(await receive(ws))
        else:  # the fuzzed frame got no answer at all
            assert allowed.silent, f"no answer to {frame!r}"
    else:
        raise AssertionError(f"unexpected reply {first} to {frame!r}")
    assert replies[-1] == {"type": "pong"}, (frame, replies)


async def neighbour_alive(world: World) -> None:
    assert world.neighbour is not None and not world.neighbour.closed
    await world.neighbour.send_str('{"type": "ping"}')
    assert await world.neighbour.receive_json(timeout=REPLY_TIMEOUT_S) == {"type": "pong"}


def process_alive(stack: Stack) -> None:
    assert stack.apis[0][0].poll() is None, "the API process died"
    assert httpx.get(stack.url + "/healthz", timeout=10).status_code == 200


# ---- strategies --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, picked in proportion to its weight."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def message_frames(real_ids: list[str]) -> st.SearchStrategy[Frame]:
    job_ids = weighted(
        (4, st.sampled_from(real_ids)),
        (1, st.text(max_size=80)),
        (2, st.from_regex(r"\A[A-Za-z0-9_-]{22}\Z")),
        (1, json_values),
    )
    sinces = weighted(
        (1, st.none()),
        (2, st.integers(min_value=0, max_value=6)),
        (1, st.integers(min_value=-5, max_value=20)),
        (2, st.sampled_from([2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1])),
        (1, st.integers(min_value=-(2**64), max_value=2**64 - 1)),
        (1, json_values),
    )
    extras = st.dictionaries(st.text(max_size=8), json_values, max_size=3)

    def message(base: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        return st.builds(lambda b, extra: {**extra, **b}, base, extras)

    subscribes = message(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["subscribe", "unsubscribe"]), "jobId": job_ids}, optional={"since": sinces}
        )
    )
    anything = message(
        st.fixed_dictionaries(
            {"type": st.one_of(st.sampled_from(["subscribe", "unsubscribe", "ping"]), json_values)},
            optional={"jobId": job_ids, "since": sinces},
        )
    )
    messages = weighted((2, subscribes), (1, anything))

    def bad_utf8(parts: tuple[bytes, bytes, bytes]) -> bytes:
        return b"".join(parts)

    def invalid(b: bytes) -> bool:
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    others = st.one_of(
        json_values.map(lambda v: Frame("text", json.dumps(v))),
        st.text(max_size=200).map(lambda t: Frame("text", t)),
        st.binary(max_size=200).map(lambda b: Frame("binary", b)),
        st.tuples(
            st.binary(max_size=20),
            st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]),
            st.binary(max_size=20),
        )
        .map(bad_utf8)
        .filter(invalid)
        .map(lambda b: Frame("bad-utf8", b)),
    )
    return weighted(
        (3, messages.map(lambda m: Frame("text", json.dumps(m)))),
        (1, messages.map(lambda m: Frame("text", json.dumps(m, ensure_ascii=False, indent=1)))),
        (2, others),
    )


# ---- tests -------------------------------------------------------------------------------------


def test_fuzzed_messages_get_contract_answers_and_never_hurt_neighbours(
    stack: Stack, loop: asyncio.AbstractEventLoop
) -> None:
    world = loop.run_until_complete(make_world(stack))
    real_ids = sorted(world.events)
    seen: list[str] = []

    @SETTINGS
    @hypothesis.given(frame=message_frames(real_ids))
    @hypothesis.example(frame=Frame("text", json.dumps({"type": "ping", "pad": "x" * (WS_MAX_MESSAGE_BYTES + 10)})))
    @hypothesis.example(frame=Frame("text", "[" * 10_000))
    @hypothesis.example(frame=Frame("text", json.dumps({"type": "subscribe", "jobId": real_ids[0], "since": 2})))
    @hypothesis.example(frame=Frame("text", json.dumps({"type": "subscribe", "jobId": real_ids[0], "since": None})))
    @hypothesis.example(frame=Frame("text", '{"type": "subscribe", "jobId": "' + real_ids[0] + '", "since": 1e400}'))
    @hypothesis.example(frame=Frame("text", '{"type": "ping", "x": NaN}'))
    @hypothesis.example(frame=Frame("text", json.dumps({"type": "subscribe", "jobId": "\x00"})))
    @hypothesis.example(frame=Frame("text", json.dumps({"type": "subscribe", "jobId": "a\udc80b"})))
    @hypothesis.example(frame=Frame("bad-utf8", b'{"type": "ping", "x": "\xff"}'))
    def run(frame: Frame) -> None:
        hypothesis.note(f"frame: {frame!r}")
        seen.append(frame.kind)
        try:
            loop.run_until_complete(exchange(world, frame))
        except BaseException:
            # what this example left unread must not reach the next one (hypothesis replays and
            # shrinks on the same socket): the next example starts on a fresh socket
            loop.run_until_complete(world.drop_fuzz_socket())
            raise
        loop.run_until_complete(neighbour_alive(world))

    try:
        run()
        process_alive(stack)
        loop.run_until_complete(neighbour_alive(world))
    finally:
        loop.run_until_complete(world.close())
    assert len(seen) >= MAX_EXAMPLES // 2, len(seen)
    assert {"text", "binary", "bad-utf8"} <= set(seen)


def test_fuzzed_connect_queries_subscribe_or_answer_not_found(stack: Stack, loop: asyncio.AbstractEventLoop) -> None:
    """`/ws?jobId=…` with arbitrary values: real jobs are subscribed, others get NOT_FOUND (or
    BAD_REQUEST), and the socket then answers a ping."""
    world = loop.run_until_complete(make_world(stack))
    real_ids = sorted(world.events)

    async def connect_and_check(ids: list[str]) -> None:
        from urllib.parse import urlencode

        ws = await world.connect("?" + urlencode([("jobId", j) for j in ids]) if ids else "")
        try:
            for job_id in ids:
                reply = await receive(ws)
                assert isinstance(reply, dict), (ids, reply)
                if job_id in world.events:
                    assert reply["type"] == "subscribed" and reply["jobId"] == job_id, reply
                    for ev in world.events[job_id]:
                        got = await receive(ws)
                        assert isinstance(got, dict) and (got["jobId"], got["seq"]) == (job_id, ev["seq"]), got
                else:
                    assert reply["type"] == "error", reply
                    check_error(reply, Allowed(errors={"NOT_FOUND", "BAD_REQUEST"}, job_id=job_id))
            await ws.send_str('{"type": "ping"}')
            assert await receive(ws) == {"type": "pong"}
        finally:
            await ws.close()

    ids = st.lists(st.one_of(st.sampled_from(real_ids), st.text(min_size=1, max_size=80)), max_size=4, unique=True)

    @hypothesis.settings(SETTINGS, max_examples=50)
    @hypothesis.given(ids=ids)
    def run(ids: list[str]) -> None:
        loop.run_until_complete(connect_and_check(ids))

    try:
        run()
        loop.run_until_complete(neighbour_alive(world))
        process_alive(stack)
    finally:
        loop.run_until_complete(world.close())


@pytest.mark.parametrize("since", [2**31, 2**53 + 1, 2**63, 2**64 - 1])
def test_huge_since_on_a_real_job_keeps_the_socket(stack: Stack, loop: asyncio.AbstractEventLoop, since: int) -> None:
    """`since` beyond any seq: `subscribed` with no events (or BAD_REQUEST), the socket open."""
    world = loop.run_until_complete(make_world(stack))
    job_id = sorted(world.events)[0]
    frame = Frame("text", json.dumps({"type": "subscribe", "jobId": job_id, "since": since}))
    try:
        loop.run_until_complete(exchange(world, frame))
        loop.run_until_complete(neighbour_alive(world))
        assert world.closes == []
    finally:
        loop.run_until_complete(world.close())
