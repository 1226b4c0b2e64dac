"""Idempotency-Key and cancellation."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from redis import Redis
from support import Api, Stack, eventually

from queues.dispatch import rq_job_id


@pytest.fixture
async def api(stack: Stack, http: aiohttp.ClientSession) -> Api:
    return Api(http, stack.url, (await stack.user(credits=100)).api_key)


async def balance(api: Api) -> int:
    _, me, _ = await api.call("GET", "/api/me")
    return int(me["credits"])


async def test_same_key_and_body_replays_the_job_and_charges_once(api: Api):
    body = {"type": "sleep", "input": {"seconds": 0, "ticks": 0}}
    s1, j1, h1 = await api.call("POST", "/api/generate", json=body, headers={"Idempotency-Key": "k-1"})
    s2, j2, h2 = await api.call("POST", "/api/generate", json=body, headers={"Idempotency-Key": "k-1"})
    assert (s1, s2) == (202, 202)
    assert j1["jobId"] == j2["jobId"]
    assert "Idempotent-Replayed" not in h1 and h2["Idempotent-Replayed"] == "true"
    assert h2["Location"] == f"/api/jobs/{j1['jobId']}"
    assert await balance(api) == 99


async def test_same_key_with_another_body_is_422(api: Api):
    await api.call(
        "POST",
        "/api/generate",
        json={"type": "sleep", "input": {"seconds": 0}},
        headers={"Idempotency-Key": "k-2"},
    )
    status, err, _ = await api.call(
        "POST",
        "/api/generate",
        json={"type": "sleep", "input": {"seconds": 1}},
        headers={"Idempotency-Key": "k-2"},
    )
    assert status == 422 and err["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert await balance(api) == 99


async def test_keys_are_scoped_to_the_user(stack: Stack, http: aiohttp.ClientSession, api: Api):
    other = Api(http, stack.url, (await stack.user()).api_key)
    body = {"type": "sleep", "input": {"seconds": 0, "ticks": 0}}
    _, a, _ = await api.call("POST", "/api/generate", json=body, headers={"Idempotency-Key": "shared"})
    _, b, _ = await other.call("POST", "/api/generate", json=body, headers={"Idempotency-Key": "shared"})
    assert a["jobId"] != b["jobId"]


async def test_concurrent_duplicates_create_one_job(api: Api):
    body = {"type": "sleep", "input": {"seconds": 0, "ticks": 0}}
    results = await asyncio.gather(
        *(api.call("POST", "/api/generate", json=body, headers={"Idempotency-Key": "race"}) for _ in range(10))
    )
    ok = [r for r in results if r[0] == 202]
    assert {r[1]["jobId"] for r in ok} and len({r[1]["jobId"] for r in ok}) == 1
    for status, bodyr, _ in results:
        assert status in (202, 409)
        if status == 409:
            assert bodyr["error"]["code"] == "IDEMPOTENCY_KEY_IN_USE"
    assert await balance(api) == 99


async def test_cancel_running_job_stops_it_on_its_worker(api: Api, stack: Stack):
    job = await api.submit("generate", {"seconds": 3600, "ticks": 0}, type="sleep")
    await api.wait(job["jobId"], until={"running"}, timeout_s=30)
    assert stack.redis is not None
    redis = Redis.from_url(stack.redis.url)
    attempt = rq_job_id(job["jobId"], 1)

    async def workers_running_it() -> list[str]:
        keys = await asyncio.to_thread(redis.keys, "orch:hb:*")
        values = await asyncio.to_thread(redis.mget, keys) if keys else []
        return [v.decode() for v in values if v is not None and v.decode() == attempt]

    assert await eventually(workers_running_it)  # a worker's heartbeat names the attempt
    status, cancelled, _ = await api.call("DELETE", f"/api/jobs/{job['jobId']}")
    assert status == 200 and cancelled["status"] == "cancelled"
    assert cancelled["error"]["code"] == "CANCELLED"
    assert cancelled["credits"] == {"charged": 1, "refunded": 1}

    async def stopped() -> bool:
        return not await workers_running_it()

    assert await eventually(stopped, timeout_s=20)  # the hour-long attempt no longer runs anywhere
    redis.close()
    final = await api.job(job["jobId"])
    assert final["status"] == "cancelled" and final["seq"] == cancelled["seq"]


async def test_cancel_by_post_and_finished_job_is_409(api: Api):
    job = await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    await api.wait(job["jobId"])
    for method, path in [
        ("DELETE", f"/api/jobs/{job['jobId']}"),
        ("POST", f"/api/jobs/{job['jobId']}/cancel"),
    ]:
        status, err, _ = await api.call(method, path)
        assert status == 409 and err["error"]["code"] == "JOB_FINISHED"


async def test_cancelled_queued_job_never_starts(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    # occupy both workers so the next job waits in the queue
    blockers = [await api.submit("generate", {"seconds": 3, "ticks": 0}, type="sleep") for _ in range(2)]
    for b in blockers:
        await api.wait(b["jobId"], until={"running"}, timeout_s=20)
    queued = await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    status, body, _ = await api.call("POST", f"/api/jobs/{queued['jobId']}/cancel")
    assert status == 200 and body["status"] == "cancelled"
    for b in blockers:
        await api.wait(b["jobId"])

    async def settled() -> bool:
        events = await api.events(queued["jobId"])
        return len(events) == 2

    await eventually(settled)
    events = await api.events(queued["jobId"])
    assert [e["status"] for e in events] == ["queued", "cancelled"]
    assert (await api.job(queued["jobId"]))["startedAt"] is None
