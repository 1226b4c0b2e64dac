"""Redis down at submit: 503 UNAVAILABLE, nothing charged, no job left behind."""

from __future__ import annotations

import aiohttp
from support import Api, Stack

STACK_WORKERS = 1


async def test_submit_with_redis_down_is_503_and_leaves_nothing(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user(credits=20)).api_key)
    assert stack.redis is not None
    stack.redis.kill()
    try:
        for body in ({"type": "sleep", "input": {"seconds": 0}}, {"input": {"prompt": "x"}}):
            status, err, _ = await api.call("POST", "/api/generate", json=body)
            assert status == 503, err
            assert err["error"]["code"] == "UNAVAILABLE"
        status, err, _ = await api.call(
            "POST",
            "/api/generate",
            json={"type": "sleep", "input": {"seconds": 0}},
            headers={"Idempotency-Key": "during-outage"},
        )
        assert status == 503
        async with http.get(stack.url + "/readyz") as r:
            assert r.status == 503
            assert "redis" in (await r.json())["error"]["message"]
        _, me, _ = await api.call("GET", "/api/me")
        assert me["credits"] == 20
        _, jobs, _ = await api.call("GET", "/api/jobs")
        assert jobs["jobs"] == []
        _, ledger, _ = await api.call("GET", "/api/me/ledger")
        assert [e["reason"] for e in ledger["entries"]] == ["topup"]
    finally:
        stack.start_redis()
    # back up: the same idempotency key now creates the job, and it runs
    status, job, _ = await api.call(
        "POST",
        "/api/generate",
        json={"type": "sleep", "input": {"seconds": 0}},
        headers={"Idempotency-Key": "during-outage"},
    )
    assert status == 202, job
    assert (await api.wait(job["jobId"], timeout_s=60))["status"] == "completed"
