"""Per-process metrics of the realtime side (sockets, streams, webhooks)."""

from __future__ import annotations

import gc
import time
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

LAG_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

WS_CLIENTS = Gauge(
    "orchestrator_websocket_clients_connected",
    "WebSocket clients connected to this process.",
    multiprocess_mode="livesum",
)
WS_MESSAGES = Counter("orchestrator_websocket_messages_total", "Messages written to WebSocket clients.")
SSE_CLIENTS = Gauge(
    "orchestrator_sse_clients_connected",
    "Server-Sent Events streams open on this process.",
    multiprocess_mode="livesum",
)
WEBHOOK_DELIVERIES = Counter(
    "orchestrator_webhook_deliveries_total",
    "Webhook delivery attempts by outcome (success, retry, failed, gone, forbidden).",
    ["outcome"],
)
DELIVERY_LAG = Histogram(
    "orchestrator_event_delivery_lag_seconds",
    "Time from an event being stored to it being written on a socket, stream or webhook.",
    ["channel"],
    buckets=LAG_BUCKETS_S,
)
_lag = {c: DELIVERY_LAG.labels(c) for c in ("ws", "sse", "webhook")}
for _outcome in ("success", "retry", "failed", "gone", "forbidden"):
    WEBHOOK_DELIVERIES.labels(_outcome)  # every outcome exported from the start, so rate() sees the first


GC_PAUSE = Histogram(
    "orchestrator_gc_pause_seconds",
    "Garbage-collection pauses of this process, by generation collected.",
    ["generation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
)


class Tally:
    """Messages written to sockets, added to the counter once per event rather than per socket;
    the event's delivery lag is observed once too, when it has been written to every socket."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def flush(self, stored_at: float = 0.0) -> None:
        if self.n:
            WS_MESSAGES.inc(self.n)
            self.n = 0
            if stored_at > 0:
                _lag["ws"].observe(max(0.0, time.time() - stored_at))


WS_TALLY = Tally()
_watching: list[Any] = []


def watch_gc() -> None:
    """Observe every garbage-collection pause of this process (once per process)."""
    started = [0.0]
    hist = [GC_PAUSE.labels(str(g)) for g in range(3)]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            hist[int(info.get("generation", 2))].observe(time.perf_counter() - started[0])

    if not _watching:
        _watching.append(on_gc)
        gc.callbacks.append(on_gc)


def event_time(event: dict[str, Any]) -> float:
    ts = event.get("ts")
    return datetime.fromisoformat(ts).timestamp() if isinstance(ts, str) else 0.0


def observe_lag(channel: str, stored_at: float, now: float) -> None:
    if stored_at > 0:
        _lag[channel].observe(max(0.0, now - stored_at))


GC_THRESHOLDS = (700, 5, 100)
"""Young passes as CPython's (every 700 allocations), the middle one twice as often (so it walks
half as much: ~5 ms here), full passes ten times rarer: with
the survivors frozen (ws_gateway.collector) the old generation is small and rarely worth a pass."""


def tune_gc() -> None:
    """Call after start-up's gc.freeze(): watch pauses and space out full collections."""
    watch_gc()
    gc.set_threshold(*GC_THRESHOLDS)
