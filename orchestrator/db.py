"""Database engines and sessions.

SQLite (default) runs in WAL mode with a busy timeout; write transactions open with
`BEGIN IMMEDIATE` so that several worker processes queue for the write lock instead of failing
with SQLITE_BUSY on a lock upgrade. Reads use a second engine with ordinary deferred transactions,
so they never wait for writers. Postgres (asyncpg) uses one engine for both.

The schema is created with SQLModel's `create_all` plus a `schema_version` row. We chose that over
Alembic while there is one schema version: `create_all` is idempotent and safe to run from every
process at start. The first change to an existing table must add Alembic with this as its base.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlmodel import SQLModel

from orchestrator import models
from orchestrator.errors import BadRequest, Unavailable
from orchestrator.settings import private_dir

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_engine(url: str, *, immediate: bool) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _create_private(path: Path) -> None:
    """An absent SQLite file is created empty, 0600, in a 0700 directory (SQLite gives its -wal
    and -shm files the database file's mode)."""
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._write_lock: asyncio.Lock | None = None
        if self.is_sqlite:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:" and not path.startswith("file:"):
                _create_private(Path(path))
            self.writer = _sqlite_engine(url, immediate=True)
            self.reader = _sqlite_engine(url, immediate=False)
        else:
            self.writer = create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
            self.reader = self.writer

    async def create_schema(self) -> None:
        async with self.writer.begin() as conn:
            if not self.is_sqlite:
                # Serialise concurrent starts of several processes on Postgres.
                await conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
            await conn.run_sync(SQLModel.metadata.create_all)
            row = (await conn.execute(text("SELECT max(version) FROM schema_version"))).scalar()
            if row is None:
                await conn.execute(
                    text("INSERT INTO schema_version (version, applied_at) VALUES (:v, :t)"),
                    {"v": models.SCHEMA_VERSION, "t": time.time()},
                )

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction: committed on exit, rolled back on error.

        On SQLite one process's writers take turns on an asyncio lock first: SQLite's busy
        handler sleeps and is unfair, so letting pooled connections race for its lock made the
        tail latency of submits seconds long under load."""
        async with self._local_write_lock(), guard(), AsyncSession(self.writer, expire_on_commit=False) as session:
            async with session.begin():
                yield session

    @asynccontextmanager
    async def _local_write_lock(self) -> AsyncIterator[None]:
        if not self.is_sqlite:
            yield
            return
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:
            yield

    def forget_connections(self) -> None:
        """In a forked child: drop the parent's pooled connections without closing them."""
        self.writer.sync_engine.dispose(close=False)
        if self.reader is not self.writer:
            self.reader.sync_engine.dispose(close=False)
        self._write_lock = None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with guard(), AsyncSession(self.reader, expire_on_commit=False) as session:
            yield session

    async def ping(self) -> None:
        async with self.reader.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()


@asynccontextmanager
async def guard() -> AsyncIterator[None]:
    """Turn a database outage into the contract's 503; integrity errors pass through."""
    try:
        yield
    except IntegrityError:
        raise
    except DataError as exc:  # a value the database cannot hold: the request's fault, not an outage
        raise BadRequest("a value in the request is out of range or not allowed") from exc
    except (OperationalError, DBAPIError, OSError, ConnectionError) as exc:
        raise Unavailable(f"database unavailable: {type(exc).__name__}") from exc
