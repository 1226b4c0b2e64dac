"""orchestrator.client against real processes: sync and async."""

from __future__ import annotations

import asyncio

import pytest
from support import Stack

from orchestrator.client import AsyncClient, Client, ClientError


async def test_async_client_submits_follows_and_cancels(stack: Stack):
    key = (await stack.user(credits=50)).api_key
    async with AsyncClient(stack.url, key) as client:
        job = await client.submit("generate", {"seconds": 0.3, "ticks": 3}, type="sleep", idempotency_key="py-1")
        seqs = [e["seq"] async for e in client.events(job["jobId"], timeout=60)]
        done = await client.wait(job["jobId"], timeout=30)
        assert done["status"] == "completed"
        assert seqs == list(range(1, done["seq"] + 1))
        tail = [e["seq"] async for e in client.events(job["jobId"], since=done["seq"] - 2, timeout=30)]
        assert tail == [done["seq"] - 1, done["seq"]]
        listing = await client.list(limit=5)
        assert listing["jobs"][0]["jobId"] == job["jobId"]
        long = await client.submit("generate", {"seconds": 30, "ticks": 0}, type="sleep")
        cancelled = await client.cancel(long["jobId"])
        assert cancelled["status"] == "cancelled"
        with pytest.raises(ClientError) as info:
            await client.cancel(long["jobId"])
        assert info.value.status == 409 and info.value.code == "JOB_FINISHED"
        with pytest.raises(TimeoutError):
            slow = await client.submit("generate", {"seconds": 5, "ticks": 0}, type="sleep")
            await client.wait(slow["jobId"], timeout=1, poll=1)


async def test_sync_client_wait_and_errors(stack: Stack):
    key = (await stack.user(credits=5)).api_key

    def run() -> None:
        with Client(stack.url, key) as client:
            job = client.submit("generate", {"seconds": 0, "ticks": 2}, type="sleep")
            assert client.wait(job["jobId"], timeout=60)["status"] == "completed"
            assert [e["type"] for e in client.events(job["jobId"], timeout=30)][-1] == "status"
            with pytest.raises(ClientError) as info:
                client.submit("train", {"name": "too-expensive"})
            assert info.value.status == 402 and info.value.code == "INSUFFICIENT_CREDITS"
            with pytest.raises(ClientError) as missing:
                client.get("nope")
            assert missing.value.status == 404

    await asyncio.to_thread(run)
