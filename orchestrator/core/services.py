"""Everything a transport needs, opened once per process. No aiohttp here (DESIGN line 3)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from redis import Redis as SyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from orchestrator.core.accounts import KeyCache
from orchestrator.core.artifacts import ArtifactStore
from orchestrator.core.auth import Tokens
from orchestrator.core.bus import EventBus
from orchestrator.core.lifecycle import Lifecycle
from orchestrator.core.ports import Dispatcher, DurableChannel
from orchestrator.core.ratelimit import Limiter
from orchestrator.core.tasktypes import Registry
from orchestrator.settings import Settings
from orchestrator.store.db import Database

RECONNECT = (ExponentialBackoff(cap=1.0, base=0.05), 3)
"""A command that fails on a broken connection is retried on a fresh one (after a Redis restart
every pooled connection is stale, and a pool built by hand has no retry by default): a few
times, so a Redis that stays down still fails fast."""


@dataclass
class Core:
    settings: Settings
    db: Database
    aredis: aioredis.Redis
    redis: redis.Redis
    registry: Registry
    bus: EventBus
    dispatcher: Dispatcher
    lifecycle: Lifecycle
    artifacts: ArtifactStore
    tokens: Tokens
    limiter: Limiter
    keys: KeyCache

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        registry: Registry,
        make_dispatcher: Callable[[SyncRedis, aioredis.Redis], Dispatcher],
        channels: Sequence[DurableChannel] = (),
        create_schema: bool = True,
    ) -> Core:
        """Opens the database and Redis pools and builds the core around the parts it is given
        (orchestrator.app.open_core is the API processes' composition)."""
        db = Database(settings.db_url)
        if create_schema:
            await db.create_schema()
        # bounded pools: a burst of callers waits for a connection instead of opening one each
        limits = {"max_connections": settings.redis_max_connections, "timeout": 10}
        opts = {"socket_connect_timeout": 2, "socket_timeout": 10, "retry_on_error": [redis.ConnectionError]}
        aredis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                settings.redis, retry=AsyncRetry(*RECONNECT), **limits, **opts
            )
        )
        sync_pool = redis.BlockingConnectionPool.from_url(settings.redis, retry=Retry(*RECONNECT), **limits, **opts)
        sync_redis = redis.Redis(connection_pool=sync_pool)
        bus = EventBus(aredis, settings.retention_days * 86400)
        dispatcher = make_dispatcher(sync_redis, aredis)
        return cls(
            settings=settings,
            db=db,
            aredis=aredis,
            redis=sync_redis,
            registry=registry,
            bus=bus,
            dispatcher=dispatcher,
            lifecycle=Lifecycle(db, bus, registry, dispatcher, channels),
            artifacts=ArtifactStore(settings.artifacts_dir),
            tokens=Tokens(settings.signing_key),
            limiter=Limiter(aredis, settings.submit_rate, settings.redeliver_rate),
            keys=KeyCache(settings.api_key_cache_s),
        )

    async def readiness(self) -> dict[str, str]:
        """'ok' or the error, for the database and Redis."""
        out: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.db.ping(), 3)
            out["database"] = "ok"
        except Exception as exc:
            out["database"] = f"down: {type(exc).__name__}"
        try:
            await asyncio.wait_for(self.aredis.ping(), 3)
            out["redis"] = "ok"
        except Exception as exc:
            out["redis"] = f"down: {type(exc).__name__}"
        return out

    async def close(self) -> None:
        await self.aredis.aclose()
        self.redis.close()
        await self.db.dispose()
