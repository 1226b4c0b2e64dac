"""Open sockets and streams per user are capped across API processes, and a process that dies
(even by kill -9) stops holding its users' slots within ORCH_SLOT_TTL_SECONDS."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest
from support import Api, Stack

STACK_ENV = {"ORCH_MAX_SOCKETS_PER_USER": "2", "ORCH_SLOT_TTL_SECONDS": "2"}
STACK_WORKERS = 1


async def refused(http: aiohttp.ClientSession, url: str, api: Api) -> bool:
    try:
        ws = await http.ws_connect(url + "/ws", headers=api.headers())
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 429
        return True
    await ws.close()
    return False


async def test_streams_count_against_the_socket_cap(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    job = await api.submit("generate", {"seconds": 60, "ticks": 1}, type="sleep")
    stream = f"{stack.url}/api/jobs/{job['jobId']}/stream"
    first = await http.get(stream, headers=api.headers())
    second = await http.get(stream, headers=api.headers())
    assert first.status == second.status == 200
    async with http.get(stream, headers=api.headers()) as third:
        assert third.status == 429
    assert await refused(http, stack.url, api)
    first.close()
    second.close()
    deadline = time.monotonic() + 20
    while await refused(http, stack.url, api):  # the server sees the streams end
        assert time.monotonic() < deadline, "slots of closed streams were not given back"
        await asyncio.sleep(0.2)
    await api.call("DELETE", f"/api/jobs/{job['jobId']}")


async def test_a_killed_api_process_gives_back_its_slots(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user()).api_key)
    stack.start_api()
    doomed = stack.url_of(len(stack.apis) - 1)
    held = [await http.ws_connect(doomed + "/ws", headers=api.headers()) for _ in range(2)]
    assert await refused(http, stack.url, api)  # the cap holds across processes
    stack.stop_api(len(stack.apis) - 1, signal.SIGKILL)
    for ws in held:
        await ws.close()
    deadline = time.monotonic() + 20
    while await refused(http, stack.url, api):
        assert time.monotonic() < deadline, "a dead process's sockets still count"
        await asyncio.sleep(0.2)
    kept = [await http.ws_connect(stack.url + "/ws", headers=api.headers()) for _ in range(2)]
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await http.ws_connect(stack.url + "/ws", headers=api.headers())
    for ws in kept:
        await ws.close()
