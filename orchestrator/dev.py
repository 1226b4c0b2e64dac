"""`orchestrator dev`: Redis (embedded, AOF in the data dir), SQLite, the API and N workers on one
machine. Ctrl-C stops every child; children are started and stopped by PID."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from orchestrator import accounts
from orchestrator.db import Database
from orchestrator.redis_server import RedisServer
from orchestrator.settings import Settings

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
                new = await accounts.create_user(db, name, DEMO_CREDITS)
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


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run_dev(settings: Settings, workers: int) -> int:
    if not _port_free(settings.host, settings.port):
        print(f"port {settings.port} on {settings.host} is in use: set ORCH_PORT to another port", file=sys.stderr)
        return 1
    settings.data_dir.mkdir(parents=True, exist_ok=True)
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
    key = asyncio.run(
        _demo_key(Settings.model_validate({"DATABASE_URL": env["DATABASE_URL"], "ORCH_DATA_DIR": env["ORCH_DATA_DIR"]}))
    )
    exe = [sys.executable, "-m", "orchestrator.cli"]
    children: list[subprocess.Popen[bytes]] = [subprocess.Popen([*exe, "serve"], env=env)]
    children += [subprocess.Popen([*exe, "worker"], env=env) for _ in range(workers)]
    url = f"http://{settings.host}:{settings.port}"
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not stopping:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if any(c.poll() is not None for c in children):
                print("a child process exited during start-up", file=sys.stderr)
                stopping = True
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
            if any(c.poll() is not None for c in children):
                print("a child process exited; stopping", file=sys.stderr)
                break
            time.sleep(0.5)
    finally:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
        for c in children:
            try:
                c.wait(15)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait(5)
        if redis_server is not None:
            redis_server.stop()
        print("stopped", flush=True)
    return 0


def data_dir_path(p: str | None) -> Path | None:
    return Path(p) if p else None
