"""Group commit: the changes that callers in one process ask for meanwhile share one transaction.

A caller hands `GroupCommit.run` a synchronous function of a SQLAlchemy `Connection` (its
change). One task per process takes every pending change, applies them in one transaction,
commits once, then sends what the changes announce (events, enqueues) in one Redis pipeline,
and only then answers the callers. One refused change (an illegal transition, a stale attempt,
insufficient credits) raises to its caller alone and undoes nothing of the others:

- a change refuses (raises `REFUSALS`) before it writes anything, so a refusal needs no undo and
  the batch runs without SAVEPOINTs (they were 40 % of the writer's time);
- any other error in a batch of several rolls it back and runs it again with each change in its
  own SAVEPOINT, so only the failing change fails; if the transaction itself fails (a deadlock
  between two processes' batches on Postgres, a lost connection), each change runs again in a
  transaction of its own;
- stored before announced: nothing is sent before the commit it belongs to has returned;
- a burst of N changes costs one commit and one Redis round trip, not N.

A failed commit fails every change of the batch (none was stored); a failed pipeline is reported
to each caller as `announced=False` (the changes are stored; the caller decides: a submit is
taken back, an event is left to SQL replay).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection

from orchestrator.errors import ApiError, IllegalTransition
from orchestrator.store.db import Database

log = logging.getLogger(__name__)

T = TypeVar("T")
Announce = Callable[[Any], None]
"""Adds Redis commands to the batch's pipeline (a `redis.asyncio` pipeline)."""

MAX_BATCH = 256
"""Changes per transaction; more wait for the next one."""
REFUSALS = (ApiError, IllegalTransition)
"""What a change may raise, and only before it has written anything."""


@dataclass
class Done(Generic[T]):
    """What a change returns: its value, and what to announce once it is committed."""

    value: T
    announce: list[Announce] = field(default_factory=list)


@dataclass
class _Pending:
    change: Callable[[Connection], Done[Any]]
    future: asyncio.Future[tuple[Any, bool]]


class GroupCommit:
    def __init__(self, db: Database, send: Callable[[list[Announce]], Awaitable[bool]]) -> None:
        self.db = db
        self.send = send
        self._pending: list[_Pending] = []
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, change: Callable[[Connection], Done[T]]) -> tuple[T, bool]:
        """Apply `change` in the next group transaction: (its value, whether its announcements
        were sent). Raises what the change raised, or the commit's error. `change` may run more
        than once (each time in a fresh transaction) and raises `REFUSALS` only before writing."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._pending, self._task = loop, [], None
        fut: asyncio.Future[tuple[Any, bool]] = loop.create_future()
        self._pending.append(_Pending(change, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._writer(), name="group-commit")
        value, sent = await fut
        return value, sent

    async def _writer(self) -> None:
        """Commits batches while changes are pending, then ends (the next `run` starts another),
        so an idle process holds no task."""
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            await self._commit(batch)

    async def _commit(self, batch: list[_Pending]) -> None:
        changes = [p.change for p in batch]
        outcomes: list[Done[Any] | Exception]
        try:
            try:
                outcomes = await self.db.run_batch(lambda conn: _apply_all(conn, changes, savepoints=False))
            except _Redo:
                outcomes = await self.db.run_batch(lambda conn: _apply_all(conn, changes, savepoints=True))
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            # the transaction itself failed (a deadlock between two processes' batches on
            # Postgres, a lost connection): each change again in a transaction of its own
            outcomes = [await self._alone(change) for change in changes]
        announce = [a for o in outcomes if isinstance(o, Done) for a in o.announce]
        sent = True
        if announce:
            try:
                sent = await self.send(announce)
            except Exception as exc:  # stored all the same: report it as not announced
                log.warning("announcing a batch of %d failed: %s", len(batch), exc)
                sent = False
        for p, o in zip(batch, outcomes, strict=True):
            if p.future.done():
                continue
            if isinstance(o, Done):
                p.future.set_result((o.value, sent))
            else:
                p.future.set_exception(o)

    async def _alone(self, change: Callable[[Connection], Done[Any]]) -> Done[Any] | Exception:
        try:
            return await self.db.run_batch(change)
        except Exception as exc:
            return exc


class _Redo(Exception):
    """A change of a batch failed otherwise than by refusing: run the batch with SAVEPOINTs."""


def _apply_all(
    conn: Connection, changes: list[Callable[[Connection], Done[Any]]], savepoints: bool
) -> list[Done[Any] | Exception]:
    if len(changes) == 1:
        return [changes[0](conn)]  # raises: the transaction rolls back, the caller gets the error
    out: list[Done[Any] | Exception] = []
    for change in changes:
        if not savepoints:
            try:
                out.append(change(conn))
            except REFUSALS as exc:
                out.append(exc)
            except Exception as exc:
                raise _Redo from exc
            continue
        savepoint = conn.begin_nested()
        try:
            out.append(change(conn))
        except Exception as exc:
            savepoint.rollback()
            out.append(exc)
        else:
            savepoint.commit()
    return out
