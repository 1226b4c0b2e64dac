"""Experiment: serialize SQLite write transactions inside one process with an asyncio.Lock."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

try:
    import orchestrator.store.db as _db

    _orig = _db.Database.write
    _locks: dict[int, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def _write(self: Any) -> AsyncIterator[Any]:
        if not self.is_sqlite:
            async with _orig(self) as s:
                yield s
            return
        lock = _locks.setdefault(id(self), asyncio.Lock())
        async with lock, _orig(self) as s:
            yield s

    _db.Database.write = _write  # type: ignore[method-assign]
except Exception as exc:  # pragma: no cover - an experiment
    import sys

    print(f"serialize_sqlite_writes: not applied ({exc})", file=sys.stderr)
