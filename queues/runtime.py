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

from orchestrator.artifacts import ArtifactStore
from orchestrator.bus import EventBus
from orchestrator.db import Database
from orchestrator.lifecycle import Lifecycle
from orchestrator.settings import Settings
from queues.dispatch import Dispatcher
from queues.registry import Registry, build_registry

T = TypeVar("T")


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="orchestrator-core", daemon=True)
        self._thread.start()
        self.registry: Registry = build_registry(settings)
        self.redis = redis.Redis.from_url(settings.redis)
        self.artifacts = ArtifactStore(settings.artifacts_dir)
        self.db = Database(settings.db_url)
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
