"""Workers killed with SIGKILL mid-job, timeouts and retries."""

from __future__ import annotations

import aiohttp
from conftest import FAST
from helpers import check_invariants, kill_worker_hard
from support import Api, Stack

STACK_ENV = FAST | {"ORCH_TASK_TIMEOUTS": '{"image": 1}', "ORCH_TASK_MAX_ATTEMPTS": '{"lora": 2, "sleep": 1}'}
STACK_WORKERS = 1


async def test_killed_worker_job_is_retried_then_completes(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    job = await api.submit("train", {"name": "crash", "steps": 1500})
    await api.wait(job["jobId"], until={"running"}, timeout_s=30)
    victim = stack.workers[0]
    kill_worker_hard(victim)
    stack.workers.remove(victim)
    stack.start_worker()
    requeued = await api.wait(job["jobId"], until={"queued", "completed", "failed"}, timeout_s=30)
    assert requeued["status"] in ("queued", "running", "completed")
    done = await api.wait(job["jobId"], timeout_s=120)
    assert done["status"] == "completed", done
    assert done["attempts"] == 2
    events = await api.events(job["jobId"])
    statuses = [e["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "queued", "running", "completed"]
    retry = [e for e in events if e["type"] == "status" and e["status"] == "queued"][1]
    assert retry["actor"] == "sweeper" and "heartbeat" in retry["message"]
    assert [e["seq"] for e in events] == list(range(1, done["seq"] + 1))
    assert done["credits"] == {"charged": 10, "refunded": 0}


async def test_killed_worker_job_without_attempts_left_fails_worker_lost_and_is_refunded(
    stack: Stack, http: aiohttp.ClientSession
):
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    job = await api.submit("generate", {"seconds": 60, "ticks": 60}, type="sleep")
    await api.wait(job["jobId"], until={"running"}, timeout_s=30)
    victim = stack.workers[0]
    kill_worker_hard(victim)
    stack.workers.remove(victim)
    stack.start_worker()
    done = await api.wait(job["jobId"], timeout_s=30)
    assert done["status"] == "failed" and done["error"]["code"] == "WORKER_LOST"
    assert done["credits"] == {"charged": 1, "refunded": 1}
    _, me, _ = await api.call("GET", "/api/me")
    assert me["credits"] == 100


async def test_job_past_its_timeout_is_stopped_and_refunded_once(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    job = await api.submit("generate", {"prompt": "slow", "width": 2048, "height": 2048, "steps": 200})
    done = await api.wait(job["jobId"], timeout_s=60)
    assert done["status"] == "timed_out" and done["error"]["code"] == "TIMEOUT"
    assert done["credits"] == {"charged": 2, "refunded": 2}
    # the worker is free again
    quick = await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    assert (await api.wait(quick["jobId"], timeout_s=30))["status"] == "completed"


async def test_retryable_errors_are_retried_with_each_attempt_in_the_history(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
    ok = await api.submit("generate", {"failAttempts": 2}, type="flaky")
    done = await api.wait(ok["jobId"], timeout_s=60)
    assert done["status"] == "completed" and done["attempts"] == 3
    assert done["result"]["attempt"] == 3
    events = await api.events(ok["jobId"])
    retries = [e for e in events if e["type"] == "status" and e["status"] == "queued"][1:]
    assert [r["data"]["nextAttempt"] for r in retries] == [2, 3]
    assert all("503" in r["message"] for r in retries)
    exhausted = await api.submit("generate", {"failAttempts": 5}, type="flaky")
    failed = await api.wait(exhausted["jobId"], timeout_s=60)
    assert failed["status"] == "failed" and failed["error"]["code"] == "PROVIDER_ERROR"
    assert failed["attempts"] == 3 and failed["credits"] == {"charged": 1, "refunded": 1}


async def test_invariants_hold_after_the_faults(stack: Stack):
    db = stack.db()
    try:
        report = await check_invariants(db)
    finally:
        await db.dispose()
    assert report["problems"] == [], report
