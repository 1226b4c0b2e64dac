"""Per-process HTTP metrics (each API process serves its own; the dashboard sums them)."""

from __future__ import annotations

from prometheus_client import Histogram

HTTP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

HTTP_DURATION = Histogram(
    "orchestrator_http_request_duration_seconds",
    "HTTP request latency by method, route pattern and status code.",
    ["method", "route", "status"],
    buckets=HTTP_BUCKETS_S,
)


def observe(method: str, route: str, status: int, seconds: float) -> None:
    if route.startswith("/static") or route.startswith("/artifacts"):
        route = route.split("/", 2)[1] and "/" + route.split("/")[1]
    HTTP_DURATION.labels(method, route, str(status)).observe(seconds)
