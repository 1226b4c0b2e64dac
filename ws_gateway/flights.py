"""Single flight: concurrent asks for one key share one call.

A call is joined only by askers that arrive before it starts (it starts on the next turn of
the event loop), so whatever it answers was read after every one of its askers asked: an
answer is never older than the question, which the ordering guarantee of
ws_gateway.subscription relies on (a subscription is registered before it asks for its replay).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Flight(Generic[V]):
    __slots__ = ("fut", "started", "task")

    def __init__(self, fut: asyncio.Future[V]) -> None:
        self.fut = fut
        self.started = False
        self.task: asyncio.Future[None] | None = None


class Flights(Generic[K, V]):
    def __init__(self) -> None:
        self._open: dict[K, _Flight[V]] = {}

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        flight = self._open.get(key)
        if flight is None or flight.started:
            flight = _Flight(asyncio.get_running_loop().create_future())
            self._open[key] = flight
            flight.task = asyncio.ensure_future(self._run(key, flight, load))
        return await asyncio.shield(flight.fut)

    async def _run(self, key: K, flight: _Flight[V], load: Callable[[], Awaitable[V]]) -> None:
        flight.started = True
        try:
            flight.fut.set_result(await load())
        except BaseException as exc:  # handed to every asker, cancellation included
            flight.fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError("lookup cancelled"))
            flight.fut.exception()  # retrieved here: no warning when every asker has gone
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._open.get(key) is flight:
                del self._open[key]
