"""Per-user limits on submits, open sockets and subscriptions per socket."""

from __future__ import annotations

import aiohttp
import pytest
from support import Api, Stack

STACK_ENV = {"ORCH_SUBMIT_RATE": "5/minute", "ORCH_MAX_SOCKETS_PER_USER": "2", "ORCH_MAX_SUBSCRIPTIONS_PER_SOCKET": "3"}
STACK_WORKERS = 1


async def test_submits_over_the_rate_get_429_with_retry_after(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    statuses = []
    for _ in range(7):
        status, body, headers = await api.call("POST", "/api/generate", json={"type": "sleep", "input": {}})
        statuses.append(status)
    assert statuses == [202] * 5 + [429] * 2
    assert body["error"]["code"] == "RATE_LIMITED"
    assert 1 <= int(headers["Retry-After"]) <= 60
    _, me, _ = await api.call("GET", "/api/me")
    assert me["credits"] == 95
    other = Api(http, stack.url, (await stack.user(credits=10)).api_key)
    status, _, _ = await other.call("POST", "/api/generate", json={"type": "sleep", "input": {}})
    assert status == 202  # limits are per user


async def test_open_sockets_per_user_are_limited(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user()).api_key)
    a = await http.ws_connect(stack.url + "/ws", headers=api.headers())
    b = await http.ws_connect(stack.url + "/ws", headers=api.headers())
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(stack.url + "/ws", headers=api.headers())
    assert info.value.status == 429
    await a.close()
    c = await http.ws_connect(stack.url + "/ws", headers=api.headers())  # a slot is free again
    await b.close()
    await c.close()


async def test_subscriptions_per_socket_are_limited(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    jobs = []
    for _ in range(4):
        status, job, _ = await api.call("POST", "/api/generate", json={"type": "sleep", "input": {"seconds": 0}})
        if status == 202:
            jobs.append(job["jobId"])
    async with http.ws_connect(stack.url + "/ws", headers=api.headers()) as ws:
        replies = []
        for job_id in jobs:
            await ws.send_json({"type": "subscribe", "jobId": job_id, "since": 10**6})
            replies.append((await ws.receive_json(timeout=10))["type"])
        assert replies[:3] == ["subscribed"] * 3
        assert replies[3:] == ["error"] * (len(jobs) - 3)
