"""The one helper for background loops (the sweeper, the webhook sender, the promoter of delayed
attempts, fal's poller, the socket-slot heartbeat, the GC policy): run a step again and again
until cancelled, log a failing step and back off, never let one failure end the loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


async def every(
    name: str,
    interval_s: float,
    step: Callable[[], Awaitable[Any]],
    *,
    max_backoff_s: float = 5.0,
    level: int = logging.WARNING,
) -> None:
    """Await `step()` every `interval_s` seconds until the task is cancelled. A step that raises is
    logged at `level` under `name`, and the pause doubles after each failure in a row, up to
    `max_backoff_s` (a database or Redis that is down is not hammered); a success resets it."""
    delay = interval_s
    while True:
        try:
            await step()
            delay = interval_s
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.log(level, "%s failed: %s", name, exc)
            delay = min(max(delay * 2, interval_s), max(max_backoff_s, interval_s))
        await asyncio.sleep(delay)
