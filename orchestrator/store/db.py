"""Database engines and sessions.

SQLite (default) runs in WAL mode with a busy timeout; write transactions open with
`BEGIN IMMEDIATE` so that several worker processes queue for the write lock instead of failing
with SQLITE_BUSY on a lock upgrade. Reads use a second engine with ordinary deferred transactions,
so they never wait for writers. Postgres (asyncpg) uses one engine for both.

The hot writes (orchestrator.core.lifecycle) go through `Database.run_batch`: one write transaction
that runs a synchronous function over SQLAlchemy Core. On SQLite it runs on this process's one
writer thread with the stdlib driver (one thread hop per transaction, not one per statement), and
takes an exclusive `flock` on `<db>.wlock` before `BEGIN IMMEDIATE`: writer processes then queue in
the kernel and hand the lock over at once, instead of polling in SQLite's busy handler, which
sleeps 1-100 ms and is unfair. On Postgres it runs on an asyncpg connection through `run_sync`.

The schema is created with SQLModel's `create_all` plus a `schema_version` row. We chose that over
Alembic while no existing table changes: `create_all` is idempotent and safe to run from every
process at start. Version 2 adds only triggers (`LEDGER_TRIGGERS`: a ledger row moves its user's
balance), created idempotently here; no table or column changes, and a version-1 database already
holds balance == sum of its ledger, so nothing is migrated. Every process must run version 2 code
(a version-1 process would move a balance twice). The first change to an existing table must
add Alembic with this as its base.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlmodel import SQLModel

from orchestrator.errors import BadRequest, Unavailable
from orchestrator.settings import private_dir
from orchestrator.store import tables

SQLITE_BUSY_TIMEOUT_MS = 30_000
T = TypeVar("T")

SQLITE_TRIGGERS = (
    """CREATE TRIGGER IF NOT EXISTS ledger_insert_moves_balance AFTER INSERT ON ledger
    BEGIN UPDATE users SET credits = credits + NEW.delta WHERE id = NEW.user_id; END""",
    """CREATE TRIGGER IF NOT EXISTS ledger_delete_moves_balance AFTER DELETE ON ledger
    BEGIN UPDATE users SET credits = credits - OLD.delta WHERE id = OLD.user_id; END""",
)
POSTGRES_TRIGGERS = (
    """CREATE OR REPLACE FUNCTION ledger_moves_balance() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'INSERT' THEN
        UPDATE users SET credits = credits + NEW.delta WHERE id = NEW.user_id;
        RETURN NEW;
      END IF;
      UPDATE users SET credits = credits - OLD.delta WHERE id = OLD.user_id;
      RETURN OLD;
    END $$""",
    """CREATE OR REPLACE TRIGGER ledger_moves_balance AFTER INSERT OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_moves_balance()""",
)
"""LEDGER_TRIGGERS: inserting (or deleting) a ledger row moves `users.credits` by its delta in the
same statement, so the balance equals the sum of the ledger by construction."""


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _sqlite_pragmas(engine: Engine, *, immediate: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlite_engine(url: str, *, immediate: bool) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, json_serializer=_json)
    _sqlite_pragmas(engine.sync_engine, immediate=immediate)
    return engine


def _create_private(path: Path) -> None:
    """An absent SQLite file is created empty, 0600, in a 0700 directory (SQLite gives its -wal
    and -shm files the database file's mode)."""
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


class _SqliteWriter:
    """This process's one SQLite writer connection, used only from its own thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.engine = create_engine(
            f"sqlite:///{path}",
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            json_serializer=_json,
        )
        _sqlite_pragmas(self.engine, immediate=True)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self.conn: Connection | None = None
        self.lock_fd: int | None = None

    def run(self, fn: Callable[[Connection], T]) -> T:
        if self.lock_fd is None:
            self.lock_fd = os.open(self.path + ".wlock", os.O_RDWR | os.O_CREAT, 0o600)
        if self.conn is None:
            self.conn = self.engine.connect()
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            with self.conn.begin():
                return fn(self.conn)
        except BaseException:
            if self.conn.invalidated:
                self.conn.close()
                self.conn = None
            raise
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def forget(self) -> None:
        """In a forked child: the thread, the connection and the lock file's open description
        (which flock shares with the parent) belong to the parent."""
        self.engine.dispose(close=False)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self.conn = None
        self.lock_fd = None

    def close(self) -> None:
        def _close() -> None:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            self.engine.dispose()
            if self.lock_fd is not None:
                os.close(self.lock_fd)
                self.lock_fd = None

        self.executor.submit(_close).result()
        self.executor.shutdown(wait=True)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._write_lock: asyncio.Lock | None = None
        self._sqlite_writer: _SqliteWriter | None = None
        if self.is_sqlite:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:" and not path.startswith("file:"):
                _create_private(Path(path))
                self._sqlite_writer = _SqliteWriter(path)
            self.writer = _sqlite_engine(url, immediate=True)
            self.reader = _sqlite_engine(url, immediate=False)
        else:
            self.writer = create_async_engine(
                url, pool_size=10, max_overflow=20, pool_pre_ping=True, json_serializer=_json
            )
            self.reader = self.writer

    async def create_schema(self) -> None:
        async with self.writer.begin() as conn:
            if not self.is_sqlite:
                # Serialise concurrent starts of several processes on Postgres.
                await conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
            await conn.run_sync(SQLModel.metadata.create_all)
            for ddl in SQLITE_TRIGGERS if self.is_sqlite else POSTGRES_TRIGGERS:
                await conn.execute(text(ddl))
            row = (await conn.execute(text("SELECT max(version) FROM schema_version"))).scalar()
            if row is None or row < tables.SCHEMA_VERSION:
                await conn.execute(
                    text("INSERT INTO schema_version (version, applied_at) VALUES (:v, :t)"),
                    {"v": tables.SCHEMA_VERSION, "t": time.time()},
                )

    async def run_batch(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` in one write transaction (committed when it returns, rolled back if it
        raises). `fn` is synchronous SQLAlchemy Core; see the module docstring for where it runs."""
        if self._sqlite_writer is not None:
            return await asyncio.get_running_loop().run_in_executor(
                self._sqlite_writer.executor, self._sqlite_writer.run, fn
            )
        async with self.writer.connect() as conn:
            return await conn.run_sync(_in_transaction, fn)

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
        if self._sqlite_writer is not None:
            self._sqlite_writer.forget()
        self._write_lock = None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with guard(), AsyncSession(self.reader, expire_on_commit=False) as session:
            yield session

    async def ping(self) -> None:
        async with self.reader.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        if self._sqlite_writer is not None:
            await asyncio.to_thread(self._sqlite_writer.close)
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()


def _in_transaction(conn: Connection, fn: Callable[[Connection], T]) -> T:
    with conn.begin():
        return fn(conn)


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
