"""No process outlives the test run that started it (issue 12): a stopped Stack takes the RQ work
horse of a running job with it, and the session-end check finds what was left."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
from support import Api, Stack, descendants, leftover_processes


async def test_stopping_a_stack_mid_job_leaves_no_process(tmp_path: Path, database_url: str):
    """The worker is told to stop while its work horse runs an hour-long job: after stop() neither
    the worker, nor the horse, nor Redis, nor the API is alive."""
    stack = Stack(tmp_path / "stack", database_url).start(workers=1)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            api = Api(http, stack.url, (await stack.user(credits=100)).api_key)
            job = await api.submit("generate", {"seconds": 3600, "ticks": 1}, type="sleep")
            await api.wait(job["jobId"], until={"running"})
        worker = stack.workers[0].pid
        deadline = time.monotonic() + 10
        while not descendants(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        horse = descendants(worker)
        assert horse, "the worker forked no work horse for the running job"
        assert any(pid == h for pid, _ in leftover_processes(tmp_path) for h in horse)
    finally:
        stack.stop()
    assert leftover_processes(tmp_path) == []


def test_the_session_check_finds_a_process_that_names_the_temp_dir(tmp_path: Path):
    proc = subprocess.Popen(
        ["sleep", "60"], env={**os.environ, "ORCH_DATA_DIR": str(tmp_path / "data")}, start_new_session=True
    )
    try:
        assert [pid for pid, _ in leftover_processes(tmp_path)] == [proc.pid]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert leftover_processes(tmp_path) == []
