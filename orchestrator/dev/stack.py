"""`orchestrator dev`: Redis (embedded, AOF in the data dir), SQLite, the API and N workers on one
machine.

Each child (the API, each worker) is a CLI command in its own process group: a child that dies
is started again after a short back-off (0.5 s doubling to 10 s, back to 0.5 s once it has run a
minute) while the others keep running; Ctrl-C (or SIGTERM) stops every child and its own
children (a worker's warm child process, say) by process group, Redis last."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from orchestrator.core import accounts
from orchestrator.dev.redis_server import RedisServer
from orchestrator.processes import descendants, parent_death_signal
from orchestrator.settings import Settings, private_dir
from orchestrator.store.db import Database

DEMO_USER = "demo"
DEMO_CREDITS = 1000


async def _demo_key(settings: Settings) -> str:
    """The demo user's key, created once and kept in the data dir (keys are stored hashed)."""
    path = settings.data_dir / "demo-api-key"
    db = Database(settings.db_url)
    try:
        await db.create_schema()
        if path.exists():
            key = path.read_text().strip()
            if await accounts.authenticate(db, key) is not None:
                return key
        name = DEMO_USER
        for i in range(2, 100):
            try:
                new = await accounts.create_user(db, name, DEMO_CREDITS, signing_key=settings.signing_key)
                break
            except accounts.UserExists:
                name = f"{DEMO_USER}{i}"
        else:
            raise RuntimeError("could not create a demo user")
        path.write_text(new.api_key)
        path.chmod(0o600)
        return new.api_key
    finally:
        await db.dispose()


BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 60.0
"""A child that ran this long before dying is restarted after BACKOFF_FIRST_S again."""
STOP_TIMEOUT_S = 15.0


def _port_free(host: str, port: int) -> bool:
    """Whether the API could listen there. SO_REUSEADDR, as the server itself binds (aiohttp does
    on Unix): connections of a stopped run in TIME-WAIT do not make the port busy."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Child:
    """One supervised CLI command (`serve`, `worker`, ...)."""

    name: str
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None
    restarts: int = 0
    family: set[int] = field(default_factory=set)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *self.args],
            env=self.env,
            start_new_session=True,  # its own group: stopped with whatever it forks
            preexec_fn=parent_death_signal(),
        )
        self.started_at = time.monotonic()
        self.restart_at = None

    def check(self) -> None:
        """Notice an exit and schedule the restart; restart when its back-off has passed."""
        now = time.monotonic()
        if self.proc is not None and self.restart_at is None and self.proc.poll() is not None:
            if now - self.started_at >= STABLE_AFTER_S:
                self.backoff_s = BACKOFF_FIRST_S
            print(
                f"{self.name} exited with code {self.proc.returncode}; restarting in {self.backoff_s:g} s",
                file=sys.stderr,
                flush=True,
            )
            _signal_group(self.proc, signal.SIGKILL)  # anything it left behind in its group
            self.restart_at = now + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)
        if self.restart_at is not None and now >= self.restart_at:
            self.restarts += 1
            self.start()

    def terminate(self) -> None:
        if self.proc is not None:
            self.family = set(descendants(self.proc.pid))
            _signal_group(self.proc, signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        """Wait for a clean exit until `deadline`, then SIGKILL the child, its group and its
        descendants (a child may lead a session of its own)."""
        if self.proc is None:
            return
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.family.update(descendants(self.proc.pid))
        _signal_group(self.proc, signal.SIGKILL)
        for pid in self.family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(5)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the child's process group (its pid: it leads a session of its own)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_dev(settings: Settings, workers: int) -> int:
    if not _port_free(settings.host, settings.port):
        print(
            f"port {settings.port} on {settings.host} is in use: pass --port (or set ORCH_PORT) with another port",
            file=sys.stderr,
        )
        return 1
    private_dir(settings.data_dir)
    env = dict(os.environ)
    env["ORCH_DATA_DIR"] = str(settings.data_dir.resolve())
    redis_server: RedisServer | None = None
    if not settings.redis_url:
        redis_server = RedisServer(
            settings.data_dir / "redis", port=int(os.environ.get("ORCH_REDIS_PORT", "0")) or None
        )
        redis_server.start()
        env["REDIS_URL"] = redis_server.url
    env.setdefault("DATABASE_URL", settings.db_url)
    own = Settings.model_validate(
        {
            "DATABASE_URL": env["DATABASE_URL"],
            "ORCH_DATA_DIR": env["ORCH_DATA_DIR"],
            "ORCH_SECRET_KEY": settings.secret_key,
        }
    )
    key = asyncio.run(_demo_key(own))
    # one API process per core, sharing the port (serve --processes: SO_REUSEPORT)
    children = [Child("api", ["serve", "--processes", str(min(64, os.cpu_count() or 1))], env)]
    children += [Child(f"worker {i + 1}", ["worker"], env) for i in range(workers)]
    url = f"http://{settings.host}:{settings.port}"
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for c in children:
            c.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not stopping:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            for c in children:
                c.check()
            time.sleep(0.2)
        if not stopping:
            print(
                f"\norchestrator is running\n"
                f"  console   {url}/#key={key}\n"
                f"  API       {url}/api  (OpenAPI: {url}/api/openapi.json)\n"
                f"  metrics   {url}/metrics\n"
                f"  redis     {env['REDIS_URL'] if 'REDIS_URL' in env else settings.redis}\n"
                f"  database  {env['DATABASE_URL']}\n"
                f"  workers   {workers}\n\n"
                f"demo API key: {key}\n\n"
                f"try:\n"
                f"  curl -s -X POST {url}/api/generate -H 'Authorization: Bearer {key}' \\\n"
                '       -H \'Content-Type: application/json\' -d \'{"input": {"prompt": "a red fox"}}\'\n\n'
                f"Ctrl-C stops everything.",
                flush=True,
            )
        while not stopping:
            for c in children:
                c.check()
            time.sleep(0.2)
    finally:
        for c in children:
            c.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for c in children:
            c.wait_or_kill(deadline)
        if redis_server is not None:
            redis_server.stop()
        print("stopped", flush=True)
    return 0


def data_dir_path(p: str | None) -> Path | None:
    return Path(p) if p else None
