"""An API process's /metrics after jobs ran through two worker processes: every contract metric with
help text, sensible buckets, and job counts equal to what the database recorded.

No Prometheus here (tests/test_prometheus_e2e.py has one): the exposition is read directly.
"""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import sys
from collections import Counter, defaultdict
from typing import Any

import aiohttp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Api, Stack, eventually, wait_http

from orchestrator.dev.redis_server import free_port
from orchestrator.states import FINAL

CONTRACT_METRICS = {
    "orchestrator_jobs_total": "counter",
    "orchestrator_job_duration_seconds": "histogram",
    "orchestrator_job_wait_seconds": "histogram",
    "orchestrator_queue_depth": "gauge",
    "orchestrator_jobs_running": "gauge",
    "orchestrator_websocket_clients_connected": "gauge",
    "orchestrator_websocket_messages_total": "counter",
    "orchestrator_sse_clients_connected": "gauge",
    "orchestrator_webhook_deliveries_total": "counter",
    "orchestrator_event_delivery_lag_seconds": "histogram",
    "orchestrator_http_request_duration_seconds": "histogram",
}
CLUSTER_WIDE = ("orchestrator_jobs_total", "orchestrator_job_duration_seconds", "orchestrator_job_wait_seconds")

Labels = tuple[tuple[str, str], ...]
Samples = dict[str, dict[Labels, float]]


def parse(exposition: str) -> Samples:
    """``{sample name: {sorted labels: value}}``."""
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def by(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for key, value in samples.get(name, {}).items():
        d = dict(key)
        out[tuple(d[label] for label in labels)] += value
    return dict(out)


def buckets(samples: Samples, name: str) -> list[float]:
    """Every ``le`` bound exposed for histogram ``name`` (finite ones), sorted."""
    bounds = {float(dict(key)["le"]) for key in samples.get(f"{name}_bucket", {})}
    return sorted(b for b in bounds if math.isfinite(b))


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


@pytest.fixture(scope="module")
def shared() -> dict[str, Any]:
    """Shared between the tests of this module (the load runs once, in the first test)."""
    return {}


@pytest.fixture
def ran(shared: dict[str, Any]) -> dict[str, Any]:
    if "exposition" not in shared:
        pytest.skip("needs test_every_contract_metric_has_help_and_counts_match_the_database to run first")
    return shared


async def run_load(stack: Stack, http: aiohttp.ClientSession) -> dict[str, str]:
    """Sleep jobs (some failing), one cancelled while running, one image and one lora; all final."""
    await asyncio.to_thread(stack.wait_for_workers, 2)
    api = Api(http, stack.url, (await stack.user(credits=1000)).api_key)
    long = await api.submit("generate", {"seconds": 30, "ticks": 0}, type="sleep")
    await api.wait(long["jobId"], until={"running"}, timeout_s=30)
    status, _, _ = await api.call("DELETE", f"/api/jobs/{long['jobId']}")
    assert status == 200
    jobs = [
        await api.submit("generate", {"seconds": 0.3, "ticks": 2, "fail": i in (1, 4)}, type="sleep") for i in range(8)
    ]
    jobs.append(await api.submit("generate", {"prompt": "fox", "width": 64, "height": 64, "steps": 2}))
    jobs.append(await api.submit("train", {"name": "fox", "steps": 20}))
    finals = {long["jobId"]: (await api.wait(long["jobId"]))["status"]}
    for job in jobs:
        finals[job["jobId"]] = (await api.wait(job["jobId"], timeout_s=90))["status"]
    assert Counter(finals.values()) == {"completed": 8, "failed": 2, "cancelled": 1}, finals
    return finals


async def test_every_contract_metric_has_help_and_counts_match_the_database(
    stack: Stack, http: aiohttp.ClientSession, shared: dict[str, Any]
) -> None:
    shared["finals"] = await run_load(stack, http)
    workers = await stack.rows("SELECT COUNT(DISTINCT worker_name) FROM jobs WHERE started_at IS NOT NULL")
    assert workers == [(2,)], "the jobs did not run on both worker processes"

    exposition = await scrape(stack.url)
    shared["exposition"] = exposition
    helps = dict(re.findall(r"^# HELP (\S+) (.+)$", exposition, re.M))
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))
    for name, kind in CONTRACT_METRICS.items():
        assert helps.get(name, "").strip(), f"{name} has no help text"
        assert types.get(name) == kind, f"{name} is {types.get(name)}, not {kind}"
    samples = parse(exposition)

    # Jobs entering each status == status events stored in SQL, per queue, type and status.
    events = await stack.rows(
        "SELECT j.queue, j.type, e.status, COUNT(*) FROM job_events e JOIN jobs j ON j.id = e.job_id "
        "WHERE e.type = 'status' GROUP BY j.queue, j.type, e.status",
    )
    assert by(samples, "orchestrator_jobs_total", "queue", "type", "status") == {
        (q, t, s): float(n) for q, t, s, n in events
    }
    finals = await stack.rows("SELECT status, COUNT(*) FROM jobs GROUP BY status")
    total_by_status = by(samples, "orchestrator_jobs_total", "status")
    assert {s: n for s, n in finals} == {s: int(total_by_status[(s,)]) for s in FINAL if (s,) in total_by_status}
    assert total_by_status[("queued",)] == total_by_status[("running",)] == 11.0

    # Run time: one observation per job that went running → final, labelled with its final status.
    ran_then_ended = await stack.rows(
        "SELECT queue, type, status, COUNT(*) FROM jobs WHERE started_at IS NOT NULL "
        "AND finished_at IS NOT NULL GROUP BY queue, type, status",
    )
    assert by(samples, "orchestrator_job_duration_seconds_count", "queue", "type", "status") == {
        (q, t, s): float(n) for q, t, s, n in ran_then_ended
    }
    cancelled_duration = by(samples, "orchestrator_job_duration_seconds_sum", "status")[("cancelled",)]
    assert 0 < cancelled_duration < 30
    # Wait: one observation per start (every job here ran exactly once).
    starts = await stack.rows(
        "SELECT queue, COUNT(*) FROM jobs WHERE started_at IS NOT NULL AND attempts = 1 GROUP BY queue"
    )
    assert by(samples, "orchestrator_job_wait_seconds_count", "queue") == {(q,): float(n) for q, n in starts}
    for name in ("orchestrator_job_duration_seconds", "orchestrator_job_wait_seconds"):
        inf = by(samples, f"{name}_bucket", "le")[("+Inf",)]
        assert inf == sum(samples[f"{name}_count"].values())

    # Queue gauges from RQ: nothing waits or runs any more.
    assert by(samples, "orchestrator_queue_depth", "queue") == {("train",): 0.0, ("generate",): 0.0}
    assert by(samples, "orchestrator_jobs_running", "queue") == {("train",): 0.0, ("generate",): 0.0}

    # Per-process metrics of this API process.
    http_counts = by(samples, "orchestrator_http_request_duration_seconds_count", "method", "route", "status")
    assert http_counts[("POST", "/api/generate", "202")] == 10.0
    assert http_counts[("POST", "/api/train", "202")] == 1.0
    assert http_counts[("DELETE", "/api/jobs/{job_id}", "200")] == 1.0
    assert samples["orchestrator_websocket_clients_connected"] == {(): 0.0}
    assert samples["orchestrator_sse_clients_connected"] == {(): 0.0}
    assert () in samples["orchestrator_websocket_messages_total"]


async def test_histogram_buckets_span_1ms_to_an_hour(ran: dict[str, Any]) -> None:
    samples = parse(ran["exposition"])
    http_bounds = buckets(samples, "orchestrator_http_request_duration_seconds")
    assert http_bounds[0] <= 0.001 and http_bounds[-1] >= 30
    assert buckets(samples, "orchestrator_job_duration_seconds")[-1] >= 3600
    assert buckets(samples, "orchestrator_job_wait_seconds")[-1] >= 3600
    lag_bounds = buckets(samples, "orchestrator_event_delivery_lag_seconds")
    assert lag_bounds[0] <= 0.001 and lag_bounds[-1] >= 10


async def test_cluster_histograms_expose_every_bucket(ran: dict[str, Any]) -> None:
    from metrics.jobs import DURATION_BUCKETS_S, WAIT_BUCKETS_S

    samples = parse(ran["exposition"])
    for name, expected in (
        ("orchestrator_job_duration_seconds", DURATION_BUCKETS_S),
        ("orchestrator_job_wait_seconds", WAIT_BUCKETS_S),
    ):
        series: dict[Labels, set[float]] = defaultdict(set)
        for key in samples[f"{name}_bucket"]:
            d = dict(key)
            le = float(d.pop("le"))
            series[tuple(sorted(d.items()))].add(le)
        for labels, bounds in series.items():
            assert bounds == {float(b) for b in expected} | {math.inf}, (name, labels, sorted(bounds))


async def test_a_second_api_process_exports_the_same_cluster_wide_values(stack: Stack, ran: dict[str, Any]) -> None:
    port = await asyncio.to_thread(stack.start_api)
    first = parse(await scrape(stack.url))
    second = parse(await scrape(f"http://127.0.0.1:{port}"))
    for name in CLUSTER_WIDE:
        for suffix in ("",) if name.endswith("_total") else ("_bucket", "_count", "_sum"):
            assert second[name + suffix] == first[name + suffix], name + suffix
            assert first[name + suffix]
    for name in ("orchestrator_queue_depth", "orchestrator_jobs_running"):
        assert second[name] == first[name]
    # ...while its own HTTP metrics start empty: it served no job submission.
    submits = by(second, "orchestrator_http_request_duration_seconds_count", "route")
    assert ("/api/generate",) not in submits


def test_worker_with_metrics_port_serves_process_metrics_only(stack: Stack) -> None:
    port = free_port()
    env = stack.env | {"ORCH_METRICS_PORT": str(port), "ORCH_HOST": "127.0.0.1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "worker", "--queues", "generate"],
        env=env,
        cwd=stack.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", proc)
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "process_cpu_seconds_total" in body or "python_info" in body
        for name in (*CLUSTER_WIDE, "orchestrator_queue_depth", "orchestrator_jobs_running"):
            assert not re.search(rf"^{name}(_bucket|_count|_sum)?[{{ ]", body, re.M), name
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_counts_stay_right_when_the_load_comes_through_both_api_processes(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    if len(stack.apis) < 2:
        await asyncio.to_thread(stack.start_api)
    key = (await stack.user(credits=100)).api_key
    before = by(parse(await scrape(stack.url)), "orchestrator_jobs_total", "status")
    jobs = []
    for i in range(4):
        api = Api(http, stack.url_of(i % 2), key)
        jobs.append(await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep"))
    for job in jobs:
        assert (await Api(http, stack.url, key).wait(job["jobId"]))["status"] == "completed"

    async def settled() -> dict[tuple[str, ...], float] | None:
        after = [by(parse(await scrape(stack.url_of(i))), "orchestrator_jobs_total", "status") for i in (0, 1)]
        return after[0] if after[0] == after[1] and after[0][("completed",)] == before[("completed",)] + 4 else None

    after = await eventually(settled, timeout_s=10)
    for status in ("queued", "running", "completed"):
        assert after[(status,)] - before[(status,)] == 4.0, status
