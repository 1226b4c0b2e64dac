"""Background work of an API process: the sweeper (and the webhook sender). Each claims its work
through SQL or a Redis lock, so several API processes never do the same work twice."""

from __future__ import annotations

import asyncio

from orchestrator.core import Core
from orchestrator.sweeper import Sweeper


def start_background(core: Core) -> list[asyncio.Task[None]]:
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(Sweeper(core).run(), name="sweeper")]
    return tasks
