"""Fixtures: each test module gets its own Redis, database and processes.

The database is SQLite unless ORCH_TEST_DB=postgres, in which case a Postgres 15 cluster is
started from the machine's binaries for the session. Under CI=true a missing Postgres fails.
Every module runs on SQLite; the Postgres pass runs the modules in `SQL_MODULES`, whose tests
depend on what the database does (transactions, row locks, constraints, value ranges, the
ledger): the rest (browsers, dashboards, gateways, process control) behave alike on both.

At the end of the session, a process the tests started that is still alive (see
`support.leftover_processes`) fails the run; it is killed and named in the report."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import Postgres, Stack, leftover_processes

BACKEND = os.environ.get("ORCH_TEST_DB", "sqlite")

SQL_MODULES = frozenset(
    {
        "test_jobs",
        "test_idempotency_cancel",
        "test_input",
        "test_hostile",
        "test_schemathesis",
        "test_outage",
        "test_webhooks",
        "test_cli",
        "test_realtime",
        "test_warm_workers",
        "test_fal_jobs",
        "test_uploads",
        "test_store",
        "test_restarts",
        "test_suite",
        "test_worker_loss",
    }
)
"""Test modules that also run on Postgres (see the module docstring)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if BACKEND != "postgres":
        return
    keep = [i for i in items if i.path.stem in SQL_MODULES]
    dropped = [i for i in items if i.path.stem not in SQL_MODULES]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres | None]:
    """One cluster per test process, in a directory of its own under /tmp rather than pytest's
    basetemp: the cluster runs as the `postgres` user, which must traverse the path, and every
    pytest session (each xdist worker) takes group and other access off /tmp/pytest-of-<user>."""
    if BACKEND != "postgres":
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="orch-test-pg-"))
    pg = Postgres(root)
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def database_url(postgres: Postgres | None, tmp_path_factory: pytest.TempPathFactory) -> str:
    if postgres is not None:
        return postgres.create_db("t_" + uuid.uuid4().hex[:12])
    return f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'orchestrator.db'}"


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> Iterator[Stack]:
    env = getattr(request.module, "STACK_ENV", {})
    workers = getattr(request.module, "STACK_WORKERS", 2)
    s = Stack(tmp_path_factory.mktemp("stack"), database_url, dict(env))
    s.start(workers=workers)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
        yield session


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's chromium, headless, driven by Playwright (the setup installs it)."""
    from playwright.async_api import async_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


LEFTOVER_GRACE_S = 10.0
"""How long a process may take to finish exiting after its fixture stopped it (pg_ctl returns
when the pid file is gone, a moment before the postmaster is)."""


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a process it started outlived it. trylast: after pytest's own
    sessionfinish, which tears down the fixtures still set up (session and module scoped)."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    root = factory.getbasetemp()
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    left = leftover_processes(root)
    while left and time.monotonic() < deadline:  # a server told to stop may still be exiting
        time.sleep(0.1)
        left = leftover_processes(root)
    if not left:
        return
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = "\n".join(f"  {pid}  {cmd[:200]}" for pid, cmd in left)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"{len(left)} process(es) started by the tests outlived them (now killed):\n{lines}"
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
