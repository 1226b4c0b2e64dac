"""Collectors read at scrape time: job counts and histograms from Redis (cluster-wide, see
metrics.jobs) and queue depth / running jobs from RQ's registries, so they are right after
any restart. Used by API processes' /metrics."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis import Redis
from rq import Queue
from rq.registry import StartedJobRegistry

from metrics.jobs import DURATION_BUCKETS_S, DURATION_KEY, SEP, TOTAL_KEY, WAIT_BUCKETS_S, WAIT_KEY


def _histogram(
    name: str, doc: str, labels: list[str], raw: dict[bytes, bytes], bounds: tuple[float, ...]
) -> HistogramMetricFamily:
    """A complete classic histogram per label set: every bucket, the empty ones as 0."""
    fam = HistogramMetricFamily(name, doc, labels=labels)
    series: dict[tuple[str, ...], dict[str, float]] = defaultdict(dict)
    for k, v in raw.items():
        parts = k.decode().split(SEP)
        series[tuple(parts[:-1])][parts[-1]] = float(v)
    for lv, values in sorted(series.items()):
        buckets = [(floatToGoString(le), values.get(str(le), 0.0)) for le in bounds]
        buckets.append(("+Inf", values.get("+Inf", 0.0)))
        fam.add_metric(list(lv), buckets, values.get("sum", 0.0))
    return fam


class ClusterCollector(Collector):
    def __init__(self, redis: Redis, queues: tuple[str, ...]) -> None:
        self.redis = redis
        self.queues = queues

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(TOTAL_KEY)
        pipe.hgetall(DURATION_KEY)
        pipe.hgetall(WAIT_KEY)
        totals, durations, waits = pipe.execute()
        jobs = CounterMetricFamily(
            "orchestrator_jobs_total",
            "Jobs entering each status (cluster-wide).",
            labels=["queue", "type", "status"],
        )
        for k, v in sorted(totals.items()):
            jobs.add_metric(k.decode().split(SEP), float(v))
        yield jobs
        yield _histogram(
            "orchestrator_job_duration_seconds",
            "Job run time, running to finished (cluster-wide).",
            ["queue", "type", "status"],
            durations,
            DURATION_BUCKETS_S,
        )
        yield _histogram(
            "orchestrator_job_wait_seconds",
            "Time from queued to running (cluster-wide).",
            ["queue"],
            waits,
            WAIT_BUCKETS_S,
        )
        depth = GaugeMetricFamily("orchestrator_queue_depth", "Jobs waiting in each RQ queue.", labels=["queue"])
        running = GaugeMetricFamily("orchestrator_jobs_running", "Jobs running per queue (RQ).", labels=["queue"])
        for name in self.queues:
            q = Queue(name, connection=self.redis)
            depth.add_metric([name], q.count)
            running.add_metric([name], StartedJobRegistry(name, connection=self.redis).count)
        yield depth
        yield running


def render(redis: Redis, queues: tuple[str, ...]) -> bytes:
    """The process's own metrics (summed over all API processes of one `serve --processes N`,
    which share PROMETHEUS_MULTIPROC_DIR) plus the cluster-wide ones."""
    own = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own = CollectorRegistry()
        MultiProcessCollector(own)
    extra = CollectorRegistry(auto_describe=False)
    extra.register(ClusterCollector(redis, queues))
    try:
        cluster = generate_latest(extra)
    except Exception:  # Redis down: still serve the process's own metrics
        cluster = b""
    return generate_latest(own) + cluster
