"""What a worker process needs to talk to the core: settings, database, Redis, lifecycle.

Built once per worker process and kept warm between jobs (event loop, engines, Redis pools, and
each task type's `setup()` result). Task handlers are synchronous and run on the worker's main
thread (so RQ's timeout signal and the watchdog's interrupt reach them); the async core runs on a
private event loop in a thread, and `run_sync` hands it coroutines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from sqlalchemy import select

from orchestrator.core.artifacts import ArtifactStore
from orchestrator.core.bus import EventBus
from orchestrator.core.lifecycle import Lifecycle
from orchestrator.core.tasktypes import Registry, TaskType
from orchestrator.delivery.channels import durable_channels
from orchestrator.settings import Settings
from orchestrator.store.db import Database
from orchestrator.store.tables import Job
from queues.dispatch import Dispatcher
from queues.registry import build_registry

T = TypeVar("T")


class Runtime:
    def __init__(self, settings: Settings, worker_name: str | None = None) -> None:
        self.settings = settings
        self.worker_name = worker_name or os.environ.get("RQ_WORKER_ID") or f"pid{os.getpid()}"
        self.interruptible: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        """Entered around a task's setup and handler; the worker's watchdog may interrupt inside."""
        self._states: dict[str, Any] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="orchestrator-core", daemon=True)
        self._thread.start()
        self.registry: Registry = build_registry(settings)
        self.redis = redis.Redis.from_url(settings.redis)
        self.artifacts = ArtifactStore(settings.artifacts_dir)
        self.db = Database(settings.db_url)
        self.aredis = self.run_sync(self._make_aredis())
        self.bus = EventBus(self.aredis, settings.retention_days * 86400)
        self.lifecycle = Lifecycle(self.db, self.bus, self.registry, Dispatcher(self.redis), durable_channels())

    async def _make_aredis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.settings.redis)

    def warm(self) -> None:
        """Open the pools and initialise the dialect and mappers before the first job."""

        async def _warm() -> None:
            async with self.db.read() as s:
                await s.execute(select(Job).limit(1))
            await self.aredis.ping()

        self.run_sync(_warm())

    def state(self, task: TaskType) -> Any:
        """The type's `setup()` result, computed on its first job in this process."""
        if task.setup is None:
            return None
        if task.name not in self._states:
            self._states[task.name] = task.setup()
        return self._states[task.name]

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
