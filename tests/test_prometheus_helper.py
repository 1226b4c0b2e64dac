"""The real-Prometheus helper works, and the dashboard's queries return data from metrics shaped like ours.

Needs Debian's ``prometheus`` package; skipped when it is missing, except in CI where it must be there.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_server import (
    PrometheusServer,
    free_port,
    load_dashboard,
    project_job_names,
    prometheus_binary,
    start_prometheus,
)

if prometheus_binary() is None:
    if os.environ.get("CI"):
        pytest.fail("prometheus is not installed: apt-get install -y prometheus", pytrace=False)
    pytest.skip("prometheus is not installed (apt-get install -y prometheus)", allow_module_level=True)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_starts_scrapes_itself_and_stops(tmp_path: Path) -> None:
    port = free_port()
    server = start_prometheus({}, port, tmp_path)
    try:
        assert server.process.poll() is None
        server.wait_for_targets(timeout=20)
        up = server.query('up{job="prometheus"}')
        assert [sample["value"][1] for sample in up] == ["1"]
        assert server.value("vector(42)") == 42.0
        assert server.query("absent_metric_that_does_not_exist") == []
        assert "static_configs" in server.config_path.read_text()
        assert "dns_sd_configs" not in server.config_path.read_text()
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert not _port_open(port)


# --- a synthetic exporter with the contract's metrics ------------------------------------------------


@dataclass
class Exporter:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    port: int = field(default_factory=free_port)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def _api_exporter() -> tuple[Exporter, list[object]]:
    exp = Exporter()
    r = exp.registry
    depth = Gauge("orchestrator_queue_depth", "queued jobs", ["queue"], registry=r)
    running = Gauge("orchestrator_jobs_running", "running jobs", ["queue"], registry=r)
    depth.labels("train").set(3)
    depth.labels("generate").set(5)
    running.labels("train").set(1)
    running.labels("generate").set(2)
    Gauge("orchestrator_websocket_clients_connected", "ws clients", registry=r).set(2)
    Gauge("orchestrator_sse_clients_connected", "sse clients", registry=r).set(1)
    metrics: list[object] = [
        Counter("orchestrator_websocket_messages", "ws messages", registry=r),
        Histogram("orchestrator_event_delivery_lag_seconds", "lag", ["channel"], registry=r),
        Histogram(
            "orchestrator_http_request_duration_seconds", "http", ["method", "route", "status"], registry=r
        ),
    ]
    return exp, metrics


def _worker_exporter() -> tuple[Exporter, list[object]]:
    exp = Exporter()
    r = exp.registry
    metrics: list[object] = [
        Counter("orchestrator_jobs", "jobs entering each status", ["queue", "type", "status"], registry=r),
        Histogram("orchestrator_job_duration_seconds", "run time", ["queue", "type", "status"], registry=r),
        Histogram("orchestrator_job_wait_seconds", "wait time", ["queue"], registry=r),
        Counter("orchestrator_webhook_deliveries", "webhook attempts", ["outcome"], registry=r),
    ]
    return exp, metrics


def _tick(api: list[list[object]], workers: list[list[object]], rng: random.Random) -> None:
    for messages, lag, http in api:
        assert isinstance(messages, Counter) and isinstance(lag, Histogram) and isinstance(http, Histogram)
        messages.inc()
        lag.labels(rng.choice(["ws", "sse", "webhook"])).observe(rng.random() / 10)
        http.labels("POST", "/api/generate", "202").observe(rng.random() / 50)
    for jobs, duration, wait, webhooks in workers:
        assert isinstance(jobs, Counter) and isinstance(duration, Histogram)
        assert isinstance(wait, Histogram) and isinstance(webhooks, Counter)
        queue, kind = rng.choice([("train", "lora"), ("generate", "image"), ("generate", "sleep")])
        status = rng.choice(["completed", "completed", "failed"])
        jobs.labels(queue, kind, status).inc()
        duration.labels(queue, kind, status).observe(rng.random() * 5)
        wait.labels(queue).observe(rng.random())
        webhooks.labels(rng.choice(["success", "failure", "retry"])).inc()


@pytest.fixture
def synthetic_stack(tmp_path: Path) -> Iterator[tuple[PrometheusServer, int]]:
    """Two API and two worker exporters, incremented every 100 ms, scraped by a real Prometheus."""
    apis = [_api_exporter() for _ in range(2)]
    workers = [_worker_exporter() for _ in range(2)]
    servers = [
        start_http_server(exp.port, addr="127.0.0.1", registry=exp.registry)[0] for exp, _ in apis + workers
    ]
    stop = threading.Event()
    rng = random.Random(7)

    def run() -> None:
        while not stop.wait(0.1):
            _tick([m for _, m in apis], [m for _, m in workers], rng)

    ticker = threading.Thread(target=run, daemon=True)
    ticker.start()
    prom = start_prometheus(
        {"api": [exp.target for exp, _ in apis], "worker": [exp.target for exp, _ in workers]},
        free_port(),
        tmp_path,
    )
    try:
        yield prom, len(apis)
    finally:
        prom.stop()
        stop.set()
        ticker.join(5)
        for server in servers:
            server.shutdown()
            server.server_close()


def test_keeps_project_job_names(synthetic_stack: tuple[PrometheusServer, int]) -> None:
    prom, _ = synthetic_stack
    prom.wait_for_targets(timeout=20)
    jobs = {target["labels"]["job"] for target in prom.targets()}
    assert jobs == set(project_job_names())
    assert prom.value('count(up{job="orchestrator-api"} == 1)') == 2
    assert prom.value('count(up{job="orchestrator-worker"} == 1)') == 2


def test_dashboard_queries_return_data(synthetic_stack: tuple[PrometheusServer, int]) -> None:
    prom, _ = synthetic_stack
    prom.wait_for_targets(timeout=20)
    queries = load_dashboard().queries()
    assert queries
    for title, expr in queries:

        def has_data(expr: str = expr) -> bool:
            return bool(prom.query(expr))

        prom.wait_until(has_data, 20, f"{title!r}: no data for {expr}")

    # Queue gauges are exported identically by every API process: the dashboard must not add them up.
    depth = dict(queries)["Queue depth"]
    by_queue = {s["metric"]["queue"]: float(s["value"][1]) for s in prom.query(depth)}
    assert by_queue == {"train": 3.0, "generate": 5.0}
    # Connection gauges are per process: they are summed.
    assert prom.value(dict(queries)["WebSocket clients"]) == 4.0
