"""Redis killed and restarted on its AOF; a job row whose enqueue never happened; retention."""

from __future__ import annotations

import asyncio

import aiohttp
from conftest import FAST
from redis import Redis
from rq import Queue
from rq.job import Job
from support import Api, Stack, eventually

from orchestrator.app import open_core
from orchestrator.settings import Settings
from queues.dispatch import rq_job_id

STACK_ENV = FAST | {"ORCH_RETENTION_DAYS": str(3 / 86400)}
STACK_WORKERS = 0


async def test_redis_restart_loses_no_queued_job(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    jobs = [await api.submit("generate", {"seconds": 0, "ticks": 2}, type="sleep") for _ in range(10)]
    assert stack.redis is not None
    stack.redis.kill()  # SIGKILL: only the AOF survives
    status, err, _ = await api.call("POST", "/api/generate", json={"type": "sleep", "input": {}})
    assert status == 503 and err["error"]["code"] == "UNAVAILABLE"
    stack.start_redis()
    for _ in range(2):
        stack.start_worker()
    for job in jobs:
        done = await api.wait(job["jobId"], timeout_s=60)
        assert done["status"] == "completed", done
    _, listing, _ = await api.call("GET", "/api/jobs", params={"limit": 100})
    assert len(listing["jobs"]) == 10
    _, me, _ = await api.call("GET", "/api/me")
    assert me["credits"] == 90


async def test_every_pooled_connection_recovers_after_a_redis_restart(stack: Stack):
    """After a restart every connection a process's pool holds is dead; each must be replaced on
    its next use, never handed to a caller as an error (a submit answered 503 minutes later)."""
    env = {k: stack.env[k] for k in ("REDIS_URL", "DATABASE_URL", "ORCH_DATA_DIR", "ORCH_SECRET_KEY")}
    core = await open_core(Settings(_env_file=None, **env), create_schema=False)  # type: ignore[call-arg]
    try:
        width = core.settings.redis_max_connections
        await asyncio.gather(*(core.aredis.blpop(["restart-test:nothing"], 0.2) for _ in range(width)))
        core.redis.ping()
        assert stack.redis is not None
        stack.redis.kill()
        stack.start_redis()
        await asyncio.gather(*(core.limiter.hit_submit(f"restart-user-{i}") for i in range(width)))
        assert core.redis.ping()
        assert core.dispatcher.redis.ping()
    finally:
        await core.close()


async def test_queued_row_missing_from_redis_is_enqueued_by_the_sweeper(stack: Stack, http: aiohttp.ClientSession):
    """As after a crash between the SQL commit and the enqueue."""
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    for proc in stack.workers:  # nobody runs it while we take it out of Redis
        proc.terminate()
        proc.wait(15)
    stack.workers.clear()
    job = await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    assert stack.redis is not None
    redis = Redis.from_url(stack.redis.url)
    rq_id = rq_job_id(job["jobId"], 1)
    Queue("generate", connection=redis).remove(rq_id)
    redis.delete(f"rq:job:{rq_id}")
    # and one that RQ still calls queued but that sits on no queue, as when a worker is killed
    # between taking a job off its queue and starting it
    taken = await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    taken_id = rq_job_id(taken["jobId"], 1)
    redis.lrem("rq:queue:generate", 0, taken_id)
    assert Job.fetch(taken_id, connection=redis).get_status() == "queued"
    redis.close()
    stack.start_worker()
    for j in (job, taken):
        done = await api.wait(j["jobId"], timeout_s=60)
        assert done["status"] == "completed"
        logs = [e for e in await api.events(j["jobId"]) if e["type"] == "log"]
        assert logs and logs[0]["actor"] == "sweeper" and "re-enqueued" in logs[0]["message"]


async def test_retention_drops_history_and_artifacts_but_keeps_job_and_ledger(
    stack: Stack, http: aiohttp.ClientSession
):
    if not stack.workers:
        stack.start_worker()
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    job = await api.submit("generate", {"prompt": "keep me briefly", "width": 64, "height": 64, "steps": 1})
    done = await api.wait(job["jobId"], timeout_s=60)
    url = stack.url + done["result"]["artifacts"][0]["url"]
    async with http.get(url) as r:
        assert r.status == 200

    async def purged() -> bool:
        return await api.events(job["jobId"]) == []

    await eventually(purged, timeout_s=30)
    async with http.get(url) as r:
        assert r.status == 404
    kept = await api.job(job["jobId"])
    assert kept["status"] == "completed" and kept["seq"] == done["seq"]
    _, ledger, _ = await api.call("GET", "/api/me/ledger")
    assert any(e["jobId"] == job["jobId"] and e["reason"] == "charge" for e in ledger["entries"])
    async with http.get(f"{stack.url}/api/jobs/{job['jobId']}/stream", headers=api.headers()) as r:
        body = await r.text()
    assert "event: snapshot" in body  # the stream of a finished job ends even without its history
