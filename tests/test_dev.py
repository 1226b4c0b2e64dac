"""`orchestrator dev`: the one command that brings up everything on a laptop, and Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from support import Api

from orchestrator.redis_server import free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _descendants(pid: int) -> list[int]:
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                child = int(stat.parent.name)
                out.append(child)
                frontier.append(child)
    return out


async def test_dev_runs_everything_prints_a_key_and_stops_on_ctrl_c(tmp_path: Path, http: aiohttp.ClientSession):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env |= {"ORCH_DATA_DIR": str(tmp_path / "data"), "ORCH_PORT": str(port), "ORCH_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "dev", "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    children: list[int] = []
    try:
        assert proc.stdout is not None
        output = ""
        deadline = time.monotonic() + 60
        while "demo API key:" not in output and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output += line
        key_match = re.search(r"demo API key: (\S+)", output)
        assert key_match, output
        assert f"http://127.0.0.1:{port}/" in output
        children = _descendants(proc.pid)
        assert len(children) >= 4  # redis, the API, two workers
        api = Api(http, f"http://127.0.0.1:{port}", key_match.group(1))
        job = await api.submit("generate", {"prompt": "dev", "width": 64, "height": 64, "steps": 2})
        assert (await api.wait(job["jobId"], timeout_s=90))["status"] == "completed"
        assert (tmp_path / "data" / "redis").is_dir()  # the embedded server keeps its AOF there
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            for pid in children:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0
    left = [pid for pid in children if _alive(pid)]
    assert left == [], f"still running after Ctrl-C: {left}"
