"""Warm workers: many jobs per process, setup() once, and the watchdog that ends a task which
ignores a cancel or its timeout, or a process that dies, without losing the job.

Worker 0 serves `generate` (the misbehaving tasks); worker 1 serves `train` with --max-jobs 2.
The sweeper is left slow (ORCH_WORKER_LOST_AFTER 60 s), so what ends these jobs is the worker's
own supervisor, not the sweeper."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from support import Api, Stack, eventually

STACK_ENV = {"ORCH_TASK_MODULES": "tasks_warm", "PYTHONPATH": str(Path(__file__).parent)}
STACK_WORKERS = 0


@pytest.fixture(scope="module", autouse=True)
def workers(stack: Stack) -> Iterator[None]:
    stack.start_worker("generate")
    stack.start_worker("train", "--max-jobs", "2")
    stack.wait_for_workers(2)
    yield


@pytest.fixture
async def api(stack: Stack, http: aiohttp.ClientSession) -> Api:
    return Api(http, stack.url, (await stack.user(credits=100)).api_key)


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        os.kill(pid, 0)
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


async def started_pid(api: Api, job_id: str) -> int:
    """The pid the task reported in its first progress event."""

    async def reported() -> int | None:
        pids = [e["data"]["pid"] for e in await api.events(job_id) if e["type"] == "progress" and e["data"]]
        return pids[0] if pids else None

    return int(await eventually(reported, timeout_s=30))


async def run(api: Api, queue: str, type_: str, seconds: float = 0) -> dict[str, object]:
    job = await api.submit(queue, {"seconds": seconds}, type=type_)
    done = await api.wait(job["jobId"], timeout_s=60)
    assert done["status"] == "completed", done
    return dict(done["result"])


async def test_two_jobs_of_a_type_share_one_process_and_one_setup(api: Api, stack: Stack):
    first = await run(api, "generate", "warm.counted")
    second = await run(api, "generate", "warm.counted")
    assert first["pid"] == second["pid"] == first["setupPid"]
    assert first["setups"] == second["setups"] == 1
    assert first["pid"] != stack.workers[0].pid  # run by the supervised worker, not the supervisor


async def test_max_jobs_recycles_the_process_with_a_fresh_setup(api: Api, stack: Stack):
    results = [await run(api, "train", "warm.recycled") for _ in range(3)]
    assert results[0]["pid"] == results[1]["pid"] != results[2]["pid"]
    assert [r["setups"] for r in results] == [1, 1, 1]
    assert not alive(int(str(results[0]["pid"])))
    assert stack.workers[1].poll() is None  # the supervisor lives on


async def test_cancel_interrupts_a_quiet_task_without_restarting_its_process(api: Api):
    job = await api.submit("generate", {"seconds": 100}, type="warm.counted")
    pid = await started_pid(api, job["jobId"])
    status, cancelled, _ = await api.call("DELETE", f"/api/jobs/{job['jobId']}")
    assert status == 200 and cancelled["status"] == "cancelled"
    after = await run(api, "generate", "warm.counted")
    assert after["pid"] == pid and alive(pid)
    final = await api.job(job["jobId"])
    assert final["status"] == "cancelled" and final["seq"] == cancelled["seq"]


async def test_task_ignoring_cancel_has_its_process_ended_and_replaced(api: Api, stack: Stack):
    job = await api.submit("generate", {"seconds": 100}, type="warm.deaf")
    pid = await started_pid(api, job["jobId"])
    status, cancelled, _ = await api.call("DELETE", f"/api/jobs/{job['jobId']}")
    assert status == 200 and cancelled["credits"] == {"charged": 3, "refunded": 3}

    async def gone() -> bool:
        return not alive(pid)

    assert await eventually(gone, timeout_s=20)
    after = await run(api, "generate", "warm.counted")
    assert after["pid"] != pid and after["setups"] == 1
    assert stack.workers[0].poll() is None
    final = await api.job(job["jobId"])
    assert final["status"] == "cancelled" and final["seq"] == cancelled["seq"]


async def test_task_ignoring_its_timeout_ends_timed_out_and_refunded(api: Api, stack: Stack):
    job = await api.submit("generate", {"seconds": 100}, type="warm.overdue")
    pid = await started_pid(api, job["jobId"])
    done = await api.wait(job["jobId"], timeout_s=60)
    assert done["status"] == "timed_out" and done["error"]["code"] == "TIMEOUT"
    assert done["credits"] == {"charged": 3, "refunded": 3}
    assert (await api.events(job["jobId"]))[-1]["actor"] == "timeout"
    assert not alive(pid)
    after = await run(api, "generate", "warm.counted")
    assert after["pid"] != pid
    assert stack.workers[0].poll() is None


async def test_task_killing_its_own_process_loses_nothing(api: Api, stack: Stack):
    job = await api.submit("generate", {"seconds": 1}, type="warm.suicide")
    pid = await started_pid(api, job["jobId"])
    done = await api.wait(job["jobId"], timeout_s=60)
    assert done["status"] == "failed" and done["error"]["code"] == "WORKER_LOST"
    assert "SIGKILL" in done["error"]["message"]  # reported at once by the supervisor, not the sweeper
    assert done["credits"] == {"charged": 3, "refunded": 3}
    _, me, _ = await api.call("GET", "/api/me")
    assert me["credits"] == 100
    after = await run(api, "generate", "warm.counted")
    assert after["pid"] != pid
    assert stack.workers[0].poll() is None
