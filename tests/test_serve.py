"""`orchestrator serve --processes N`: several API processes on one port, one live event stream.

Which process serves a connection is the kernel's choice (SO_REUSEPORT); the tests find out from
/proc which child holds the server end of each connection, so "another process" is checked,
not assumed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import Stack, wait_http

from orchestrator.dev.redis_server import free_port
from orchestrator.processes import parent_death_signal

STACK_WORKERS = 1


@pytest.fixture
def served(stack: Stack) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--processes", "2"],
        preexec_fn=parent_death_signal(),
        env=stack.env | {"ORCH_PORT": str(port)},
        cwd=stack.root,
        stdout=open(stack.root / f"serve-{port}.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout_s=120)
        wait_children(proc.pid, 2)
        for child in children(proc.pid):  # every child is up, not only the first to answer
            wait_listening(child, port)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def wait_children(pid: int, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(children(pid)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} children of {pid}"
        time.sleep(0.1)


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def wait_listening(pid: int, port: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(local == port and remote == 0 for local, remote, inode in tcp_rows() if inode in socket_inodes(pid)):
        assert time.monotonic() < deadline, f"process {pid} is not listening on {port}"
        time.sleep(0.1)


def tcp_rows() -> list[tuple[int, int, str]]:
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            rows.append((int(parts[1].rsplit(":", 1)[1], 16), int(parts[2].rsplit(":", 1)[1], 16), parts[9]))
    return rows


def server_pid(supervisor: int, server_port: int, client_port: int) -> int:
    """The child process holding the server end of the connection from `client_port`."""
    inodes = {inode for local, remote, inode in tcp_rows() if local == server_port and remote == client_port}
    found = [pid for pid in children(supervisor) if socket_inodes(pid) & inodes]
    assert len(found) == 1, (found, inodes)
    return found[0]


def raw_submit(port: int, key: str, supervisor: int) -> tuple[dict[str, Any], int]:
    """POST a sleep job on a connection of our own; returns the job and the process that served it."""
    body = json.dumps({"type": "sleep", "input": {"seconds": 1.5, "ticks": 6}}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        pid = server_pid(supervisor, port, sock.getsockname()[1])
        head = (
            f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        raw = b""
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    status_line, _, rest = raw.partition(b"\r\n")
    assert b" 202 " in status_line, raw[:500]
    return json.loads(rest.partition(b"\r\n\r\n")[2]), pid


async def test_a_socket_on_one_process_gets_the_events_of_a_job_submitted_through_another(
    stack: Stack, served: tuple[subprocess.Popen[bytes], int]
):
    proc, port = served
    key = (await stack.user(credits=100)).api_key
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        sockets: dict[int, aiohttp.ClientWebSocketResponse] = {}  # server pid → a socket it holds
        opened = []
        for _ in range(40):  # the kernel spreads connections by hash: bounded tries until both hold one
            ws = await http.ws_connect(url + "/ws", headers={"Authorization": f"Bearer {key}"})
            opened.append(ws)
            sockets.setdefault(server_pid(proc.pid, port, ws.get_extra_info("sockname")[1]), ws)
            if len(sockets) == 2:
                break
        assert len(sockets) == 2, "40 sockets all landed on one process"
        job, submitted_on = raw_submit(port, key, proc.pid)
        other = next(pid for pid in sockets if pid != submitted_on)
        ws = sockets[other]
        await ws.send_json({"type": "subscribe", "jobId": job["jobId"], "since": 0})
        seqs, last = [], None
        deadline = time.monotonic() + 60
        while last is None or last["status"] not in ("completed", "failed", "cancelled", "timed_out"):
            msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            data = json.loads(msg.data)
            if data.get("type") in ("status", "progress", "log") and data.get("jobId") == job["jobId"]:
                seqs.append(data["seq"])
                last = data
        for w in opened:
            await w.close()
    assert last["status"] == "completed"
    assert seqs == list(range(1, len(seqs) + 1))  # every event, in order, none twice
    assert len(seqs) >= 9  # queued, running, 6 ticks, completed


async def test_metrics_of_every_process_answer_on_any(stack: Stack, served: tuple[subprocess.Popen[bytes], int]):
    _, port = served
    async with aiohttp.ClientSession() as http:
        for _ in range(6):  # new connections land on either process; each answers for both
            async with http.get(f"http://127.0.0.1:{port}/healthz", headers={"Connection": "close"}) as r:
                assert r.status == 200
        async with http.get(f"http://127.0.0.1:{port}/metrics", headers={"Connection": "close"}) as r:
            text = await r.text()
    counts = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("orchestrator_http_request_duration_seconds_count{") and 'route="/healthz"' in line
    ]
    assert sum(counts) >= 6


def test_sigterm_stops_every_child(stack: Stack, served: tuple[subprocess.Popen[bytes], int]):
    proc, _ = served
    kids = children(proc.pid)
    assert len(kids) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert not [k for k in kids if Path(f"/proc/{k}").exists() and "zombie" not in _state(k)]


def test_a_killed_supervisor_leaves_no_orphans(stack: Stack, served: tuple[subprocess.Popen[bytes], int]):
    proc, _ = served
    kids = children(proc.pid)
    proc.kill()
    proc.wait(5)
    deadline = time.monotonic() + 20
    while [k for k in kids if Path(f"/proc/{k}").exists() and "zombie" not in _state(k)]:
        assert time.monotonic() < deadline, "API processes outlived their supervisor"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0]
    except (FileNotFoundError, IndexError):
        return "zombie"
