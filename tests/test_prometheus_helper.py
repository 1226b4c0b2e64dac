"""The real-Prometheus helper works, and the dashboard's queries return data from metrics shaped like ours.

The synthetic exporters model how the orchestrator produces metrics: job counts and histograms live in
Redis (recorded by whichever process makes a transition) and every API process exports the same
cluster-wide values, as it does the queue gauges read from RQ; HTTP and realtime metrics are per API
process; workers serve only process metrics. The dashboard must take one copy of the former and sum the
latter.

Needs Debian's ``prometheus`` package; skipped when it is missing, except in CI where it must be there.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    start_http_server,
)
from prometheus_client.registry import Collector
from prometheus_server import (
    PrometheusServer,
    free_port,
    load_dashboard,
    project_job_names,
    prometheus_binary,
    start_prometheus,
)
from support import skip_or_fail

if prometheus_binary() is None:
    if os.environ.get("CI"):
        pytest.fail("prometheus is not installed: apt-get install -y prometheus", pytrace=False)
    skip_or_fail("prometheus is not installed (apt-get install -y prometheus)")


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


# --- synthetic exporters shaped like the orchestrator's ---------------------------------------------

DURATION_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
WS_CLIENTS = (2, 3)  # per API process


@dataclass
class Exporter:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    port: int = field(default_factory=free_port)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class Cluster:
    """What Redis holds: job metrics recorded by every process, and the RQ queue gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("orchestrator_jobs", "jobs entering each status", ["queue", "type", "status"], registry=r)
        self.duration = Histogram(
            "orchestrator_job_duration_seconds",
            "run time",
            ["queue", "type", "status"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.wait = Histogram("orchestrator_job_wait_seconds", "wait time", ["queue"], registry=r)
        depth = Gauge("orchestrator_queue_depth", "queued jobs", ["queue"], registry=r)
        running = Gauge("orchestrator_jobs_running", "running jobs", ["queue"], registry=r)
        depth.labels("train").set(3)
        depth.labels("generate").set(5)
        running.labels("train").set(1)
        running.labels("generate").set(2)
        self.transitions = 0

    def tick(self, rng: random.Random) -> None:
        queue, kind = rng.choice([("train", "lora"), ("generate", "image"), ("generate", "sleep")])
        status = rng.choice(["completed", "completed", "failed"])
        self.jobs.labels(queue, kind, status).inc()
        self.duration.labels(queue, kind, status).observe(rng.random() * 5)
        self.wait.labels(queue).observe(rng.random())
        self.transitions += 1


class ClusterView(Collector):
    """An API process's scrape-time read of the cluster-wide values (the same in every process)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def collect(self) -> Iterable[Any]:
        return self.cluster.registry.collect()


@dataclass
class Api:
    exporter: Exporter
    messages: Counter
    lag: Histogram
    http: Histogram
    webhooks: Counter

    def tick(self, rng: random.Random) -> None:
        self.messages.inc()
        self.lag.labels(rng.choice(["ws", "sse", "webhook"])).observe(rng.random() / 10)
        self.http.labels("POST", "/api/generate", "202").observe(rng.random() / 50)
        self.webhooks.labels(rng.choice(["success", "failed", "retry"])).inc()


def _api_exporter(cluster: Cluster, ws_clients: int) -> Api:
    exp = Exporter()
    r = exp.registry
    r.register(ClusterView(cluster))
    Gauge("orchestrator_websocket_clients_connected", "ws clients", registry=r).set(ws_clients)
    Gauge("orchestrator_sse_clients_connected", "sse clients", registry=r).set(1)
    return Api(
        exp,
        Counter("orchestrator_websocket_messages", "ws messages", registry=r),
        Histogram("orchestrator_event_delivery_lag_seconds", "lag", ["channel"], registry=r),
        Histogram("orchestrator_http_request_duration_seconds", "http", ["method", "route", "status"], registry=r),
        Counter("orchestrator_webhook_deliveries", "webhook attempts", ["outcome"], registry=r),
    )


def _worker_exporter() -> Exporter:
    """A worker with ORCH_METRICS_PORT: process metrics only, no job metrics."""
    exp = Exporter()
    PlatformCollector(registry=exp.registry)
    return exp


@dataclass
class SyntheticStack:
    prom: PrometheusServer
    cluster: Cluster
    apis: list[Api]
    stop_ticking: Any


@pytest.fixture
def synthetic_stack(tmp_path: Path) -> Iterator[SyntheticStack]:
    """Two API and two worker exporters over one cluster, ticking every 100 ms, scraped by Prometheus."""
    cluster = Cluster()
    apis = [_api_exporter(cluster, n) for n in WS_CLIENTS]
    workers = [_worker_exporter() for _ in range(2)]
    servers = [
        start_http_server(exp.port, addr="127.0.0.1", registry=exp.registry)[0]
        for exp in [api.exporter for api in apis] + workers
    ]
    stop = threading.Event()
    rng = random.Random(7)

    def run() -> None:
        while not stop.wait(0.1):
            cluster.tick(rng)
            for api in apis:
                api.tick(rng)

    ticker = threading.Thread(target=run, daemon=True)
    ticker.start()

    def stop_ticking() -> None:
        stop.set()
        ticker.join(5)
        assert not ticker.is_alive()

    prom = start_prometheus(
        {"api": [api.exporter.target for api in apis], "worker": [exp.target for exp in workers]},
        free_port(),
        tmp_path,
    )
    try:
        yield SyntheticStack(prom, cluster, apis, stop_ticking)
    finally:
        prom.stop()
        stop_ticking()
        for server in servers:
            server.shutdown()
            server.server_close()


def test_keeps_project_job_names(synthetic_stack: SyntheticStack) -> None:
    prom = synthetic_stack.prom
    prom.wait_for_targets(timeout=20)
    jobs = {target["labels"]["job"] for target in prom.targets()}
    assert jobs == set(project_job_names())
    assert prom.value('count(up{job="orchestrator-api"} == 1)') == 2
    assert prom.value('count(up{job="orchestrator-worker"} == 1)') == 2


def test_dashboard_queries_return_data_and_count_each_job_once(synthetic_stack: SyntheticStack) -> None:
    prom, cluster = synthetic_stack.prom, synthetic_stack.cluster
    prom.wait_for_targets(timeout=20)
    queries = load_dashboard().queries()
    by_title = dict(queries)
    assert queries
    for title, expr in queries:

        def has_data(expr: str = expr) -> bool:
            return bool(prom.query(expr))

        prom.wait_until(has_data, 20, f"{title!r}: no data for {expr}")

    # Queue gauges are exported identically by every API process: the dashboard must not add them up.
    depth = {s["metric"]["queue"]: float(s["value"][1]) for s in prom.query(by_title["Queue depth"])}
    assert depth == {"train": 3.0, "generate": 5.0}
    running = {s["metric"]["queue"]: float(s["value"][1]) for s in prom.query(by_title["Running jobs"])}
    assert running == {"train": 1.0, "generate": 2.0}
    # Connection gauges are per process: they are summed.
    assert prom.value(by_title["WebSocket clients"]) == float(sum(WS_CLIENTS))
    assert prom.value(by_title["SSE clients"]) == 2.0

    # Job rates: both API processes export the same counters, the dashboard counts them once.
    # (rate() over [1m] extrapolates from the samples present: wait until each API process has 10 of them,
    # so the two processes' rates differ by a sample at most.)
    samples = 'min(count_over_time(up{job="orchestrator-api"}[1m]))'
    prom.wait_until(lambda: (prom.value(samples) or 0) >= 10, 30, "10 scrapes of each API process")
    at = time.time()
    naive = prom.value("sum(rate(orchestrator_jobs_total[1m]))", at=at)
    dashboard = prom.value(by_title["Job throughput by status and type"], at=at)
    assert naive and dashboard
    assert 0.45 * naive <= dashboard <= 0.6 * naive, (dashboard, naive)

    # Once the load stops, the de-duplicated counts equal the cluster's, exactly; a plain sum doubles them.
    synthetic_stack.stop_ticking()
    total = float(cluster.transitions)
    dedup_total = "sum(max without (instance, job) (orchestrator_jobs_total))"
    dedup_waits = "sum(max without (instance, job) (orchestrator_job_wait_seconds_count))"
    prom.wait_until(lambda: prom.value(dedup_total) == total, 20, f"{dedup_total} never reached {total}")
    prom.wait_until(lambda: prom.value(dedup_waits) == total, 20, f"{dedup_waits} never reached {total}")
    prom.wait_until(
        lambda: prom.value("sum(orchestrator_jobs_total)") == 2 * total,
        20,
        "both API processes export the counts",
    )
