"""Per-process metrics of the realtime side (sockets, streams, webhooks)."""

from __future__ import annotations

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


def event_time(event: dict[str, Any]) -> float:
    ts = event.get("ts")
    return datetime.fromisoformat(ts).timestamp() if isinstance(ts, str) else 0.0


def observe_lag(channel: str, stored_at: float, now: float) -> None:
    if stored_at > 0:
        _lag[channel].observe(max(0.0, now - stored_at))
