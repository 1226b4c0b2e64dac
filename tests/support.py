"""Real parts for the tests: a Redis-compatible server, Postgres (from the machine's binaries, run
as an unprivileged user), API and worker processes, all on 127.0.0.1 and started by PID.

Every API and worker process leads a process group of its own and is stopped with its group, so
what it forked (an RQ work horse in the middle of a long job) goes with it. `STARTED` records
every PID; conftest's session-end check fails the run if one of them, or any process whose
arguments or environment name the run's temp dir, is still alive (`leftover_processes`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from orchestrator.core import accounts
from orchestrator.dev.redis_server import RedisServer, free_port
from orchestrator.processes import descendants, parent_death_signal
from orchestrator.states import FINAL
from orchestrator.store.db import Database

ROOT = Path(__file__).resolve().parent.parent
STARTED: list[int] = []
"""PIDs of the processes the tests started (Stack's, and any passed to `track`)."""


def track(proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
    STARTED.append(proc.pid)
    return proc


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _mentions(pid: int, needle: bytes) -> bool:
    for part in ("cmdline", "environ"):
        try:
            if needle in Path(f"/proc/{pid}/{part}").read_bytes():
                return True
        except OSError:
            continue
    return False


def leftover_processes(root: Path) -> list[tuple[int, str]]:
    """Live processes that the tests started, or whose command line or environment names a path
    under `root` (the run's temp dir): (pid, command line) each; this process excluded."""
    needle = str(root.resolve()).encode() + b"/"
    ours = set(STARTED)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if (pid in ours or _mentions(pid, needle)) and _alive(pid):
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            found.append((pid, cmd))
    return found


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / name).exists():
            return str(base / name)
    return None


class Postgres:
    """A throwaway Postgres cluster in a temp dir, on a free port, run as user `postgres` when we
    are root (initdb and pg_ctl refuse to run as root)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.data = root / "pgdata"
        self.user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> Postgres:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("Postgres binaries (initdb, pg_ctl) not found")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.root.chmod(0o755)
            # the parents must be traversable by that user
            for parent in self.root.parents:
                if str(parent).startswith("/tmp") and parent != Path("/tmp"):
                    parent.chmod(parent.stat().st_mode | 0o711)
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        opts = f"-p {self.port} -k {self.root} -h 127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(
            pg_ctl,
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.root / "pg.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def url(self, db: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        psql = _pg_bin("psql") or "psql"
        subprocess.run(
            [
                psql,
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-c",
                f"CREATE DATABASE {name}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        return self.url(name)

    def stop(self) -> None:
        """pg_ctl stop, then wait for the postmaster itself to be gone (SIGKILL after 30 s): pg_ctl
        can return, or fail, while the postmaster still runs."""
        pg_ctl = _pg_bin("pg_ctl")
        pidfile = self.data / "postmaster.pid"
        try:
            postmaster = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            postmaster = None
        if pg_ctl and self.data.exists():
            try:
                self._run(pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                pass
        if postmaster is None:
            return
        deadline = time.monotonic() + 30
        while _alive(postmaster) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(postmaster, signal.SIGKILL)


@dataclass
class Stack:
    """An orchestrator on real processes: Redis, API process(es) and worker process(es)."""

    root: Path
    database_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    api_args: list[str] = field(default_factory=list)
    """Extra arguments of `orchestrator serve` (e.g. `--processes 2`)."""
    redis: RedisServer | None = None
    apis: list[tuple[subprocess.Popen[bytes], int]] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        assert self.redis is not None
        env = dict(os.environ)
        env.update(
            {
                "REDIS_URL": self.redis.url,
                "DATABASE_URL": self.database_url,
                "ORCH_DATA_DIR": str(self.root / "data"),
                "ORCH_SECRET_KEY": "test-secret-key",
                "ORCH_WEBHOOK_ALLOW_PRIVATE": "1",
                "ORCH_LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.apis[0][1]}"

    def url_of(self, i: int) -> str:
        return f"http://127.0.0.1:{self.apis[i][1]}"

    def start_redis(self) -> None:
        self.redis = RedisServer(self.root / "redis", port=self.redis.port if self.redis else None).start()

    def start(self, workers: int = 2, apis: int = 1) -> Stack:
        self.start_redis()
        for _ in range(apis):
            self.start_api()
        for _ in range(workers):
            self.start_worker()
        return self

    def _log(self, name: str) -> Any:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        return open(self.root / "logs" / name, "ab")

    def start_api(self, port: int | None = None, index: int | None = None) -> int:
        port = port or free_port()
        env = self.env | {"ORCH_PORT": str(port)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "serve", *self.api_args],
            preexec_fn=parent_death_signal(),
            start_new_session=True,
            env=env,
            cwd=self.root,
            stdout=self._log(f"api-{port}.log"),
            stderr=subprocess.STDOUT,
        )
        track(proc)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        if index is None:
            self.apis.append((proc, port))
        else:
            self.apis[index] = (proc, port)
        return port

    def stop_api(self, index: int = 0, sig: int = signal.SIGTERM) -> None:
        proc, _ = self.apis[index]
        _stop(proc, sig)

    def restart_api(self, index: int = 0) -> None:
        _, port = self.apis[index]
        self.stop_api(index)
        self.start_api(port, index)

    def start_worker(self, queues: str = "train,generate", *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "worker", "--queues", queues, *args],
            preexec_fn=parent_death_signal(),
            start_new_session=True,
            env=self.env,
            cwd=self.root,
            stdout=self._log(f"worker-{len(self.workers)}.log"),
            stderr=subprocess.STDOUT,
        )
        track(proc)
        self.workers.append(proc)
        return proc

    def wait_for_workers(self, count: int, timeout_s: float = 30) -> None:
        """Until `count` RQ workers are registered (bounded)."""
        from redis import Redis
        from rq import Worker

        assert self.redis is not None
        conn = Redis.from_url(self.redis.url)
        try:
            deadline = time.monotonic() + timeout_s
            while Worker.count(connection=conn) < count:
                assert time.monotonic() < deadline, f"fewer than {count} RQ workers after {timeout_s} s"
                time.sleep(0.1)
        finally:
            conn.close()

    def stop(self) -> None:
        for proc in self.workers:
            _stop(proc, signal.SIGTERM)
        for proc, _ in self.apis:
            _stop(proc, signal.SIGTERM)
        if self.redis is not None:
            self.redis.stop()

    async def user(self, credits: int = 1000, name: str | None = None) -> accounts.NewUser:
        db = Database(self.database_url)
        try:
            await db.create_schema()
            key = self.env["ORCH_SECRET_KEY"]
            return await accounts.create_user(db, name or f"u{time.monotonic_ns()}", credits, signing_key=key)
        finally:
            await db.dispose()

    def db(self) -> Database:
        return Database(self.database_url)

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of a read-only SQL query against the stack's database."""
        from sqlalchemy import text

        db = self.db()
        try:
            async with db.read() as s:
                return [tuple(row) for row in (await s.execute(text(sql))).all()]
        finally:
            await db.dispose()


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process, give it 15 s, then SIGKILL it and everything it started (its group,
    and its descendants: an RQ work horse runs in a session of its own and would otherwise go on
    with a long job, orphaned, after its worker is killed)."""
    family = set(descendants(proc.pid))
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            family.update(descendants(proc.pid))
            proc.kill()
            proc.wait(5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s")


class Api:
    """A tiny HTTP helper bound to one user's key."""

    def __init__(self, session: aiohttp.ClientSession, base: str, key: str) -> None:
        self.session, self.base, self.key = session, base, key

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.key}"}
        h.update(extra or {})
        return h

    async def call(
        self,
        method: str,
        path: str,
        json: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        params: Any = None,
    ) -> tuple[int, Any, Any]:
        async with self.session.request(
            method, self.base + path, json=json, data=data, params=params, headers=self.headers(headers)
        ) as r:
            body = await r.read()
            try:
                parsed = await r.json(content_type=None) if body else None
            except ValueError:
                parsed = body
            return r.status, parsed, r.headers

    async def submit(self, queue: str, input: dict[str, Any], **extra: Any) -> dict[str, Any]:
        status, body, _ = await self.call("POST", f"/api/{queue}", json={"input": input, **extra})
        assert status == 202, body
        return dict(body)

    async def job(self, job_id: str) -> dict[str, Any]:
        status, body, _ = await self.call("GET", f"/api/jobs/{job_id}")
        assert status == 200, body
        return dict(body)

    async def wait(self, job_id: str, timeout_s: float = 60, until: set[str] | None = None) -> dict[str, Any]:
        """Long-poll until the job reaches one of `until` (final statuses by default)."""
        until = until or FINAL
        deadline = time.monotonic() + timeout_s
        job = await self.job(job_id)
        while job["status"] not in until:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            status, body, _ = await self.call(
                "GET", f"/api/jobs/{job_id}", params={"waitSeconds": 2, "afterSeq": job["seq"]}
            )
            assert status == 200, body
            job = body
        return dict(job)

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        status, body, _ = await self.call("GET", f"/api/jobs/{job_id}/events")
        assert status == 200, body
        return list(body["events"])


async def eventually(check: Any, timeout_s: float = 20, interval_s: float = 0.1) -> Any:
    """Await `check()` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise TimeoutError(f"condition not met in {timeout_s} s (last: {last!r})")


def skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine that lacks a tool; fail under CI=true, where it must be there."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: required)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
