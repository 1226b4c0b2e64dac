"""What a worker process needs to talk to the core: settings, database, Redis, lifecycle.

Task handlers are synchronous and run on the work horse's main thread (so RQ's timeout signal
and the stop command reach them); the async core runs on a private event loop in a thread, and
`run_sync` hands it coroutines.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from sqlalchemy import select

from orchestrator.artifacts import ArtifactStore
from orchestrator.bus import EventBus
from orchestrator.db import Database
from orchestrator.lifecycle import Lifecycle
from orchestrator.models import Job, JobEvent
from orchestrator.settings import Settings
from queues.dispatch import Dispatcher
from queues.registry import Registry, build_registry

T = TypeVar("T")


_WARM_DB: Database | None = None


def warm_database(settings: Settings) -> None:
    """In the worker, before forking: build the engines, initialise the dialects and configure the
    mappers once, so every work horse inherits them instead of paying for them per job."""
    global _WARM_DB
    db = Database(settings.db_url)

    async def warm() -> None:
        async with db.read() as s:
            await s.execute(select(Job).limit(1))
            await s.execute(select(JobEvent).limit(1))
        await db.dispose()  # no connection crosses the fork

    asyncio.run(warm())
    _WARM_DB = db


def _inherited_db(url: str) -> Database:
    if _WARM_DB is not None and _WARM_DB.url == url:
        _WARM_DB.forget_connections()
        return _WARM_DB
    return Database(url)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="orchestrator-core", daemon=True)
        self._thread.start()
        self.registry: Registry = build_registry(settings)
        self.redis = redis.Redis.from_url(settings.redis)
        self.artifacts = ArtifactStore(settings.artifacts_dir)
        self.db = _inherited_db(settings.db_url)
        self.aredis = self.run_sync(self._make_aredis())
        self.bus = EventBus(self.aredis, settings.retention_days * 86400)
        self.lifecycle = Lifecycle(self.db, self.bus, self.registry, Dispatcher(self.redis))

    async def _make_aredis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.settings.redis)

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        async def _close() -> None:
            await self.aredis.aclose()
            await self.db.dispose()

        try:
            self.run_sync(_close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
            self.redis.close()
