"""`orchestrator dev`: the one command that brings up everything on a laptop, Ctrl-C, a restart
right after a stop, and a child that dies being started again while the others run on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
from support import Api, descendants, track

from orchestrator.dev.redis_server import free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _start_dev(tmp_path: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    """`orchestrator dev` with one worker; (the process, the demo key) once it printed the key."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env |= {"ORCH_DATA_DIR": str(tmp_path / "data"), "ORCH_PORT": str(port), "ORCH_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "dev", "--workers", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    track(proc)
    assert proc.stdout is not None
    output = ""
    deadline = time.monotonic() + 60
    while "demo API key:" not in output and "in use" not in output and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output += line
    key = re.search(r"demo API key: (\S+)", output)
    if key is None:
        _stop_dev(proc)
        raise AssertionError(f"dev did not start: {output}")
    return proc, key.group(1)


def _stop_dev(proc: subprocess.Popen[str]) -> list[int]:
    """Ctrl-C; returns the PIDs of its processes that are still alive afterwards."""
    family = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    left = [pid for pid in family if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def _children(pid: int) -> list[int]:
    return [c for c in descendants(pid) if Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid)]


def _time_wait_on(port: int) -> bool:
    """Whether a TCP connection from `port` is in TIME-WAIT (from /proc/net/tcp, state 06)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "06":
            return True
    return False


def _api_pid(dev: subprocess.Popen[str]) -> int:
    for pid in descendants(dev.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in args:
            return pid
    raise AssertionError("dev runs no `serve` child")


def test_dev_starts_again_at_once_after_a_stop(tmp_path: Path):
    """A client still connected when dev stops leaves the port in TIME-WAIT on the server side;
    dev binds as the server does (SO_REUSEADDR) and so starts again at once."""
    port = free_port()
    proc, key = _start_dev(tmp_path, port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        assert client.get("/api/me", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert _stop_dev(proc) == []
    assert _time_wait_on(port), "the stop left no TIME-WAIT connection: the test proves nothing"
    proc, again = _start_dev(tmp_path, port)
    try:
        assert again == key  # the same data dir, the same demo user
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
    finally:
        assert _stop_dev(proc) == []


async def test_dev_restarts_a_killed_api_while_the_worker_runs_on(tmp_path: Path, http: aiohttp.ClientSession):
    port = free_port()
    proc, key = _start_dev(tmp_path, port)
    try:
        api = Api(http, f"http://127.0.0.1:{port}", key)
        job = await api.submit("generate", {"seconds": 3, "ticks": 3}, type="sleep")
        await api.wait(job["jobId"], until={"running"})
        old_api = _api_pid(proc)
        others = [pid for pid in _children(proc.pid) if pid != old_api]  # redis, the worker
        assert len(others) == 2, others
        os.kill(old_api, signal.SIGKILL)
        deadline = time.monotonic() + 60
        new_api = None
        while time.monotonic() < deadline:
            try:
                new_api = _api_pid(proc)
                if new_api != old_api and httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except (AssertionError, httpx.HTTPError):
                pass
            time.sleep(0.2)
        assert new_api is not None and new_api != old_api, "the API was not started again"
        assert all(_alive(pid) for pid in others), "a child other than the API stopped"
        # the job the worker was running went on, and the new API reports it
        assert (await api.wait(job["jobId"], timeout_s=60))["status"] == "completed"
        assert proc.poll() is None
    finally:
        assert _stop_dev(proc) == []
