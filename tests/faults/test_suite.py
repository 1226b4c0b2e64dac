"""The fault suite: 200 mixed jobs while a worker is killed, Redis is killed and restarted, and an
API process is restarted; then the invariants are checked over the database."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import aiohttp
from conftest import FAST
from helpers import check_invariants, kill_worker_hard
from support import FINAL, Stack

STACK_ENV = FAST | {"ORCH_SUBMIT_RATE": "100000/minute", "ORCH_TASK_MAX_ATTEMPTS": '{"sleep": 2}'}
STACK_WORKERS = 3
JOBS = 200


def mix(rng: random.Random, i: int) -> tuple[str, dict[str, Any], str]:
    """(queue, body, what to do with it)"""
    r = rng.random()
    if i % 40 == 0:
        return "train", {"input": {"name": f"f{i}", "steps": 50}}, "run"
    if i % 40 == 1:
        return "generate", {"input": {"prompt": f"fault {i}", "width": 64, "height": 64, "steps": 2}}, "run"
    if r < 0.10:
        return "generate", {"type": "sleep", "input": {"seconds": 0, "ticks": 1, "fail": True}}, "run"
    if r < 0.20:
        return "generate", {"type": "sleep", "input": {"seconds": 2, "ticks": 4}}, "cancel"
    if r < 0.25:
        return "generate", {"type": "flaky", "input": {"failAttempts": 1}}, "run"
    return (
        "generate",
        {"type": "sleep", "input": {"seconds": rng.choice([0, 0.1, 0.3]), "ticks": rng.randint(0, 3)}},
        "run",
    )


class Client:
    """Retries through outages with the same Idempotency-Key, on whichever API answers."""

    def __init__(self, http: aiohttp.ClientSession, stack: Stack, key: str) -> None:
        self.http, self.stack, self.key = http, stack, key
        self.retries = 0

    async def call(self, method: str, path: str, body: Any = None, idem: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.key}"}
        if idem:
            headers["Idempotency-Key"] = idem
        deadline = time.monotonic() + 90
        attempt = 0
        while True:
            base = self.stack.url_of(attempt % len(self.stack.apis))
            attempt += 1
            try:
                async with self.http.request(method, base + path, json=body, headers=headers) as r:
                    data = await r.json(content_type=None)
                    if r.status not in (502, 503) and not (r.status == 409 and idem):
                        return r.status, data
            except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {path} kept failing")
            self.retries += 1
            await asyncio.sleep(0.2)


async def test_two_hundred_mixed_jobs_through_faults(stack: Stack, http: aiohttp.ClientSession):
    stack.start_api()
    user = await stack.user(credits=10_000)
    client = Client(http, stack, user.api_key)
    rng = random.Random(7)
    plan = [mix(rng, i) for i in range(JOBS)]
    ids: list[str] = []
    to_cancel: list[str] = []
    faults: list[str] = []

    async def submit(i: int) -> None:
        queue, body, action = plan[i]
        status, job = await client.call("POST", f"/api/{queue}", body, idem=f"job-{i}")
        assert status == 202, job
        ids.append(job["jobId"])
        if action == "cancel":
            to_cancel.append(job["jobId"])

    sem = asyncio.Semaphore(8)

    async def guarded(i: int) -> None:
        async with sem:
            await submit(i)

    async def chaos() -> None:
        await asyncio.sleep(1.5)
        victim = stack.workers[0]
        kill_worker_hard(victim)
        stack.workers.remove(victim)
        faults.append("SIGKILL worker 0 and its work horse")
        stack.start_worker()
        await asyncio.sleep(1.5)
        assert stack.redis is not None
        stack.redis.kill()
        faults.append("SIGKILL redis")
        await asyncio.sleep(2)
        stack.start_redis()
        faults.append("redis restarted on its AOF")
        await asyncio.sleep(1.5)
        stack.restart_api(0)
        faults.append("API process 0 restarted")

    chaos_task = asyncio.create_task(chaos())
    await asyncio.gather(*(guarded(i) for i in range(JOBS)))
    for job_id in to_cancel:
        status, body = await client.call("DELETE", f"/api/jobs/{job_id}")
        assert status in (200, 409), body
    await chaos_task
    # workers may have died with Redis: restart any that exited, as a supervisor would
    for i, proc in enumerate(list(stack.workers)):
        if proc.poll() is not None:
            stack.workers[i] = stack.start_worker()
            stack.workers.pop()

    deadline = time.monotonic() + 240
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            status, job = await client.call("GET", f"/api/jobs/{job_id}")
            if status == 200 and job["status"] in FINAL:
                pending.discard(job_id)
        if pending:
            await asyncio.sleep(1)
    if pending:
        stuck = []
        for job_id in pending:
            _, job = await client.call("GET", f"/api/jobs/{job_id}")
            _, events = await client.call("GET", f"/api/jobs/{job_id}/events")
            stuck.append({"job": job, "events": events["events"]})
        raise AssertionError(f"{len(pending)} jobs not final: {json.dumps(stuck, indent=1)}")

    db = stack.db()
    try:
        report = await check_invariants(db)
    finally:
        await db.dispose()
    report.update({"faults": faults, "client retries through outages": client.retries})
    print("\nFAULT SUITE SUMMARY\n" + json.dumps(report, indent=2))
    assert len(ids) == JOBS and report["jobs"] == JOBS
    assert report["problems"] == [], report["problems"]
