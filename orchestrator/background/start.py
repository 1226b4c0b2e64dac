"""Background work of every API process: the sweeper, the webhook sender and the promoter of
delayed attempts. Each claims its work through SQL or Redis, so several API processes never do
the same work twice."""

from __future__ import annotations

import asyncio
import logging

from orchestrator.background.sweeper import Sweeper
from orchestrator.core.services import Core
from orchestrator.delivery.sender import Sender
from orchestrator.fal import poller as fal_poll
from orchestrator.loops import every

log = logging.getLogger(__name__)

PROMOTE_INTERVAL_S = 0.25


async def promote_delayed(core: Core) -> None:
    """Move retry attempts whose backoff is over into their RQ queue."""
    await every(
        "promoting delayed attempts", PROMOTE_INTERVAL_S, lambda: asyncio.to_thread(core.dispatcher.promote_due)
    )


def start_background(core: Core) -> list[asyncio.Task[None]]:
    return [
        asyncio.create_task(Sweeper(core).run(), name="sweeper"),
        asyncio.create_task(Sender(core).run(), name="webhook-sender"),
        asyncio.create_task(promote_delayed(core), name="delayed-attempts"),
        *fal_poll.background_tasks(core),
    ]
