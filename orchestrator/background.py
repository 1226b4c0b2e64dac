"""Background work of an API process: the webhook sender and the sweeper (started per process;
each claims work through SQL or a Redis lock, so several processes never do it twice)."""

from __future__ import annotations

import asyncio

from orchestrator.core import Core


def start_background(core: Core) -> list[asyncio.Task[None]]:
    tasks: list[asyncio.Task[None]] = []
    return tasks
