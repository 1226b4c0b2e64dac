"""Garbage collection for a process that holds many sockets.

CPython's full collections walk every tracked object, and each open socket is ~80 of them
(aiohttp's protocol, transport, request, reader, writer, timers, our subscription): with
10,000 sockets a full pass takes hundreds of milliseconds on a small machine, and every socket
waits meanwhile. So what sockets keep is frozen (`gc.freeze()`: kept out of every collection;
reference counting still frees it): at the end of a collection of the young generations, when
sockets were opened since the last freeze, whatever survived is frozen. At that moment the
young generations are empty and their garbage was just collected, so only survivors are
frozen, at no extra cost. Full collections then walk only what is young and unfrozen, whatever
the number of sockets.

The price: a closed aiohttp connection leaves reference cycles (~34 objects, measured) that only
a full collection can free, and frozen objects are never collected. So once the sockets closed
since the last thaw reach a quarter of those frozen (at least `MIN_THAW_SOCKETS`), or after
`THAW_EVERY_S`, everything is thawed, collected in one pass and frozen again (checked every
`CHECK_EVERY_S`): one long pause per quarter of the sockets replaced, where CPython's own rule
(a full pass each time long-lived objects grow by a quarter) pays it as they arrive, which is
during a reconnecting crowd.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

from orchestrator.loops import every

log = logging.getLogger(__name__)

CHECK_EVERY_S = 2.0
MIN_THAW_SOCKETS = 1000
THAW_EVERY_S = 3600.0


class Collector:
    def __init__(self) -> None:
        self.open = 0
        self.opened = 0
        """Sockets opened since the last freeze."""
        self.frozen = 0
        """Sockets open at the last freeze (or thaw)."""
        self.closed = 0
        """Sockets closed since the last thaw."""
        self.thawed_at = time.monotonic()

    def socket_opened(self) -> None:
        self.open += 1
        self.opened += 1

    def socket_closed(self) -> None:
        self.open -= 1
        self.closed += 1

    def after_collection(self, phase: str, info: dict[str, Any]) -> None:
        """gc callback: freeze the survivors of a young collection when sockets were opened."""
        if phase == "stop" and info.get("generation", 0) >= 1 and self.opened:
            gc.freeze()
            self.frozen += self.opened
            self.opened = 0

    async def _check(self) -> None:
        self.thaw_if_due()

    def thaw_if_due(self) -> bool:
        if self.closed >= max(MIN_THAW_SOCKETS, self.frozen // 4) or (
            time.monotonic() - self.thawed_at > THAW_EVERY_S and self.frozen
        ):
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.frozen, self.opened, self.closed = self.open, 0, 0
            self.thawed_at = time.monotonic()
            return True
        return False

    async def run(self) -> None:
        if self.after_collection not in gc.callbacks:
            gc.callbacks.append(self.after_collection)
        try:
            await asyncio.sleep(CHECK_EVERY_S)
            await every("garbage collection policy", CHECK_EVERY_S, self._check)
        finally:
            gc.callbacks.remove(self.after_collection)


COLLECTOR = Collector()
