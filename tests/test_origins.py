"""Browsers on other origins (contract, added 2026-12-02): listed origins get CORS on /api, SSE
and artifacts, preflight included; /ws refuses a foreign Origin before the upgrade unless
ORCH_WS_ALLOW_ANY_ORIGIN=1; SSE says `no-cache, no-transform`. All over real HTTP."""

from __future__ import annotations

import aiohttp
import pytest
from support import Api, Stack

APP = "http://app.example:3000"
OTHER = "https://other.example"
EVIL = "http://evil.example"
STACK_ENV = {"ORCH_CORS_ORIGINS": f"{APP}, {OTHER}/"}
STACK_WORKERS = 1


@pytest.fixture
async def api(stack: Stack, http: aiohttp.ClientSession) -> Api:
    return Api(http, stack.url, (await stack.user(credits=500)).api_key)


def assert_cors(headers: object, origin: str) -> None:
    h = dict(headers)  # type: ignore[call-overload]
    assert h.get("Access-Control-Allow-Origin") == origin, h
    exposed = {x.strip() for x in h.get("Access-Control-Expose-Headers", "").split(",")}
    assert {"Location", "ETag", "Retry-After", "Idempotent-Replayed"} <= exposed, h
    assert "Access-Control-Allow-Credentials" not in h
    assert "Origin" in h.get("Vary", "")


async def test_a_preflight_from_a_listed_origin_is_answered(stack: Stack, http: aiohttp.ClientSession):
    headers = {
        "Origin": APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    }
    async with http.options(f"{stack.url}/api/generate", headers=headers) as r:
        assert r.status == 204
        assert_cors(r.headers, APP)
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        allowed = r.headers["Access-Control-Allow-Headers"].lower()
        assert all(h in allowed for h in ("authorization", "content-type", "idempotency-key"))


async def test_a_preflight_from_an_unlisted_origin_gets_no_cors(stack: Stack, http: aiohttp.ClientSession):
    headers = {"Origin": EVIL, "Access-Control-Request-Method": "GET"}
    async with http.options(f"{stack.url}/api/jobs", headers=headers) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "FORBIDDEN"
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_rest_answers_to_a_listed_origin_carry_cors_and_expose_location(api: Api):
    status, job, headers = await api.call(
        "POST", "/api/generate", json={"input": {"seconds": 0}, "type": "sleep"}, headers={"Origin": OTHER}
    )
    assert status == 202 and headers["Location"] == f"/api/jobs/{job['jobId']}"
    assert_cors(headers, OTHER)
    status, _, headers = await api.call("GET", "/api/jobs", headers={"Origin": APP})
    assert status == 200
    assert_cors(headers, APP)


async def test_errors_to_a_listed_origin_carry_cors_so_the_page_can_read_them(
    stack: Stack, http: aiohttp.ClientSession
):
    async with http.get(f"{stack.url}/api/jobs", headers={"Origin": APP, "Authorization": "Bearer nope"}) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "UNAUTHORIZED"
        assert_cors(r.headers, APP)


async def test_an_unlisted_origin_gets_no_cors_headers(api: Api):
    status, _, headers = await api.call("GET", "/api/jobs", headers={"Origin": EVIL})
    assert status == 200
    assert "Access-Control-Allow-Origin" not in headers


async def test_sse_to_a_listed_origin_carries_cors_and_no_transform(
    stack: Stack, api: Api, http: aiohttp.ClientSession
):
    job = await api.submit("generate", {"seconds": 0, "ticks": 1}, type="sleep")
    await api.wait(job["jobId"])
    _, tok, _ = await api.call("POST", "/api/tokens", json={"jobIds": [job["jobId"]], "ttlSeconds": 60})
    url = f"{stack.url}/api/jobs/{job['jobId']}/stream?token={tok['token']}"
    async with http.get(url, headers={"Origin": APP}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Cache-Control"] == "no-cache, no-transform"
        assert_cors(r.headers, APP)
        body = await r.text()
    assert "event: " in body or "data: " in body


async def test_artifacts_to_a_listed_origin_carry_cors(stack: Stack, api: Api, http: aiohttp.ClientSession):
    job = await api.submit("generate", {"prompt": "a fox", "width": 64, "height": 64, "steps": 1})
    job = await api.wait(job["jobId"], timeout_s=90)
    assert job["status"] == "completed", job
    url = job["result"]["artifacts"][0]["url"]
    async with http.get(stack.url + url, headers={"Origin": APP}) as r:
        assert r.status == 200 and (await r.read()).startswith(b"\x89PNG")
        assert_cors(r.headers, APP)


async def ws_status(http: aiohttp.ClientSession, url: str, key: str, origin: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} | ({"Origin": origin} if origin else {})
    try:
        async with http.ws_connect(f"{url}/ws", headers=headers) as ws:
            await ws.send_json({"type": "ping"})
            await ws.close()
            return 101
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status


async def test_ws_refuses_a_foreign_origin_before_the_upgrade(api: Api, stack: Stack, http: aiohttp.ClientSession):
    headers = {"Authorization": f"Bearer {api.key}", "Origin": EVIL}
    async with http.get(
        f"{stack.url}/ws",
        headers=headers
        | {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "FORBIDDEN"
    assert await ws_status(http, stack.url, api.key, EVIL) == 403


async def test_ws_accepts_listed_origins_its_own_origin_and_no_origin(
    api: Api, stack: Stack, http: aiohttp.ClientSession
):
    assert await ws_status(http, stack.url, api.key, APP) == 101
    assert await ws_status(http, stack.url, api.key, OTHER) == 101
    assert await ws_status(http, stack.url, api.key, stack.url) == 101
    assert await ws_status(http, stack.url, api.key, None) == 101


async def test_ws_allow_any_origin_opts_out_of_the_check(api: Api, stack: Stack, http: aiohttp.ClientSession):
    stack.extra_env["ORCH_WS_ALLOW_ANY_ORIGIN"] = "1"
    try:
        stack.start_api()
    finally:
        del stack.extra_env["ORCH_WS_ALLOW_ANY_ORIGIN"]
    try:
        assert await ws_status(http, stack.url_of(1), api.key, EVIL) == 101
    finally:
        stack.stop_api(1)
        stack.apis.pop(1)
