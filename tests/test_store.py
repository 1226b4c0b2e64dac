"""The lean store: group commit, the charge, the API key cache. These drive the lifecycle in the
test process against the stack's real Redis and database (no worker takes the jobs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from redis import Redis
from sqlalchemy import event, text
from support import Stack, eventually

from orchestrator import keys
from orchestrator.app import open_core
from orchestrator.core import accounts
from orchestrator.core.services import Core
from orchestrator.errors import IllegalTransition, InsufficientCredits
from orchestrator.settings import Settings

STACK_WORKERS = 0
STACK_ENV = {"ORCH_API_KEY_CACHE_SECONDS": "1", "ORCH_SWEEP_INTERVAL": "3600"}
"""No sweeper: the jobs here run on no worker, which it would rightly call lost."""


@pytest.fixture
async def core(stack: Stack) -> AsyncIterator[Core]:
    env = {k: stack.env[k] for k in ("REDIS_URL", "DATABASE_URL", "ORCH_DATA_DIR", "ORCH_SECRET_KEY")}
    c = await open_core(Settings(_env_file=None, **env))  # type: ignore[call-arg]
    try:
        yield c
    finally:
        await c.close()


def commits_of(c: Core) -> list[int]:
    """Counts the write transactions the lifecycle commits."""
    counter = [0]
    engine = c.db._sqlite_writer.engine if c.db._sqlite_writer is not None else c.db.writer.sync_engine

    def on_commit(_conn: Any) -> None:
        counter[0] += 1

    event.listen(engine, "commit", on_commit)
    return counter


async def test_a_burst_of_progress_from_many_jobs_shares_commits_and_keeps_seqs_gapless(stack: Stack, core: Core):
    user = await stack.user(credits=1000)
    task = core.registry.get("sleep")
    assert task is not None
    jobs = [(await core.lifecycle.submit(user.user_id, task, {"seconds": 0, "ticks": 0}))[0] for _ in range(20)]
    for j in jobs:
        assert await core.lifecycle.start(j.id, "worker:test", "test") is not None
    stored_when_seen: list[bool] = []
    seen: list[tuple[str, int]] = []
    ids = {j.id for j in jobs}
    sub = aioredis.Redis.from_url(stack.env["REDIS_URL"])
    pubsub = sub.pubsub()
    await pubsub.subscribe(keys.EVENTS_CHANNEL)

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] != "message":
                continue
            ev = orjson.loads(msg["data"])
            if ev["jobId"] not in ids:
                continue
            rows = await stack.rows(f"SELECT 1 FROM job_events WHERE job_id = '{ev['jobId']}' AND seq = {ev['seq']}")
            stored_when_seen.append(bool(rows))
            seen.append((ev["jobId"], ev["seq"]))

    listener = asyncio.create_task(listen())
    commits = commits_of(core)
    calls = [
        core.lifecycle.progress(j.id, tick * 10.0, f"tick {tick}", {"tick": tick}, "worker:test", attempt=1)
        for tick in range(1, 11)
        for j in jobs
    ]
    stale = [core.lifecycle.progress(j.id, 50.0, "stale", None, "worker:old", attempt=7) for j in jobs[:5]]
    results = await asyncio.gather(*calls, *stale, return_exceptions=True)
    assert all(not isinstance(r, BaseException) for r in results[: len(calls)])
    assert all(isinstance(r, IllegalTransition) for r in results[len(calls) :])  # refused alone
    assert commits[0] < len(calls)  # coalesced: fewer commits than changes
    await eventually(lambda: asyncio.sleep(0, len(seen) >= len(calls)), timeout_s=30)
    listener.cancel()
    await sub.aclose()
    assert all(stored_when_seen)  # every event was in SQL when it was announced
    for j in jobs:
        seqs = [r[0] for r in await stack.rows(f"SELECT seq FROM job_events WHERE job_id = '{j.id}' ORDER BY seq")]
        assert seqs == list(range(1, 13))  # queued, running, 10 ticks: no gap, none twice
        ticks = [s for jid, s in seen if jid == j.id]
        assert sorted(ticks) == list(range(3, 13))


async def test_concurrent_submits_never_overdraw_and_balance_is_the_ledger(stack: Stack, core: Core):
    task = core.registry.get("sleep")
    assert task is not None
    user = await stack.user(credits=task.cost * 5)
    results = await asyncio.gather(
        *(core.lifecycle.submit(user.user_id, task, {"seconds": 0, "ticks": 0}) for _ in range(40)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if isinstance(r, tuple)) == 5
    assert all(isinstance(r, InsufficientCredits) for r in results if not isinstance(r, tuple))
    [(credits, ledger, charges)] = await stack.rows(
        "SELECT u.credits, (SELECT sum(delta) FROM ledger l WHERE l.user_id = u.id),"
        " (SELECT count(*) FROM ledger l WHERE l.user_id = u.id AND reason = 'charge')"
        f" FROM users u WHERE u.id = '{user.user_id}'"
    )
    assert (credits, ledger, charges) == (0, 0, 5)
    jobs = await stack.rows(f"SELECT count(*) FROM jobs WHERE user_id = '{user.user_id}'")
    assert jobs == [(5,)]


async def test_a_submit_is_enqueued_as_rq_reads_it(stack: Stack, core: Core):
    from rq.job import Job as RQJob

    user = await stack.user(credits=100)
    task = core.registry.get("sleep")
    assert task is not None
    job, _ = await core.lifecycle.submit(user.user_id, task, {"seconds": 0, "ticks": 0})
    conn = Redis.from_url(stack.env["REDIS_URL"])
    try:
        rq_job = RQJob.fetch(f"{job.id}_a1", connection=conn)
        assert rq_job.func_name == "queues.runner.run_job"
        assert rq_job.args == (job.id,)
        assert rq_job.origin == "generate"
        assert rq_job.get_status() == "queued"
        assert f"{job.id}_a1".encode() in conn.lrange("rq:queue:generate", 0, -1)
    finally:
        conn.close()


async def test_the_key_cache_serves_a_key_until_its_ttl(stack: Stack, core: Core):
    user = await stack.user(credits=0)
    cache = accounts.KeyCache(3600)
    assert (await accounts.authenticate(core.db, user.api_key, cache)) is not None
    await revoke(core, user.user_id)
    cached = await accounts.authenticate(core.db, user.api_key, cache)
    assert cached is not None and cached.id == user.user_id  # within the TTL: the cached answer
    assert (await accounts.authenticate(core.db, user.api_key, accounts.KeyCache(0))) is None


async def test_a_revoked_key_stops_working_after_the_ttl(stack: Stack, core: Core, http: aiohttp.ClientSession):
    user = await stack.user(credits=0)
    headers = {"Authorization": f"Bearer {user.api_key}"}
    async with http.get(stack.url + "/api/me", headers=headers) as r:
        assert r.status == 200
    await revoke(core, user.user_id)

    async def refused() -> bool:
        async with http.get(stack.url + "/api/me", headers=headers) as r:
            return r.status == 401

    await eventually(refused, timeout_s=20, interval_s=0.2)  # ORCH_API_KEY_CACHE_SECONDS=1


async def revoke(core: Core, user_id: str) -> None:
    async with core.db.write() as s:
        await s.execute(
            text("UPDATE users SET api_key_hash = :h WHERE id = :u"), {"h": "revoked-" + user_id, "u": user_id}
        )


async def test_a_change_failing_after_it_wrote_fails_alone_and_leaves_nothing(stack: Stack, core: Core):
    from sqlalchemy import Connection, insert

    from orchestrator.store.group_commit import Done, GroupCommit
    from orchestrator.store.tables import IdempotencyKey

    table = IdempotencyKey.__table__  # type: ignore[attr-defined]
    writer = GroupCommit(core.db, core.bus.send)

    def add(key: str, twice: bool = False) -> Any:
        def change(conn: Connection) -> Done[str]:
            row = {"user_id": "u-gc", "key": key, "request_hash": "h", "job_id": None, "created_at": 0.0}
            conn.execute(insert(table), row)
            if twice:
                conn.execute(insert(table), row)  # the primary key refuses it, after the first write
            return Done(key)

        return change

    results = await asyncio.gather(
        *(writer.run(add(f"k{i}", twice=(i == 3))) for i in range(8)), return_exceptions=True
    )
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [3]
    rows = await stack.rows("SELECT key FROM idempotency_keys WHERE user_id = 'u-gc' ORDER BY key")
    assert rows == [(f"k{i}",) for i in range(8) if i != 3]  # k3's first insert was undone too
