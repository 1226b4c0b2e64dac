"""The dashboard against the real thing: two API processes and two workers, scraped by a real Prometheus.

A small mixed load (sleep jobs that complete or fail, jobs cancelled while queued and while running, an
image and a lora) runs through both API processes while a WebSocket client and an SSE stream are open.
Then every query of the dashboard is evaluated through Prometheus's HTTP API: each must return data,
and the job counts Prometheus sees must equal the status events stored in the database.

Needs Debian's ``prometheus`` package; skipped when it is missing, except in CI where it must be there.
Run with ``-s`` to see nothing more: the table of queries and values is printed either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from prometheus_server import PrometheusServer, free_port, load_dashboard, prometheus_binary, start_prometheus
from support import Api, Stack, skip_or_fail

from orchestrator.states import FINAL

if prometheus_binary() is None:
    if os.environ.get("CI"):
        pytest.fail("prometheus is not installed: apt-get install -y prometheus", pytrace=False)
    skip_or_fail("prometheus is not installed (apt-get install -y prometheus)")

STACK_WORKERS = 2
WEBHOOK_METRIC = "orchestrator_webhook_deliveries_total"
DEDUP_JOBS = "sum by (queue, type, status) (max without (instance, job) (orchestrator_jobs_total))"


# --- helpers -----------------------------------------------------------------------------------------


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking call (Prometheus HTTP API, process start) without stalling the open sockets."""
    return await asyncio.to_thread(fn, *args)


async def prom_wait(prom: PrometheusServer, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    await in_thread(prom.wait_until, predicate, timeout_s, what)


async def db_status_events(stack: Stack) -> dict[tuple[str, str, str], float]:
    """Status events stored in SQL, per queue, type and status: one per job entering a status."""
    rows = await stack.rows(
        "SELECT j.queue, j.type, e.status, COUNT(*) FROM job_events e JOIN jobs j ON j.id = e.job_id "
        "WHERE e.type = 'status' GROUP BY j.queue, j.type, e.status",
    )
    return {(q, t, s): float(n) for q, t, s, n in rows}


def prom_jobs(prom: PrometheusServer, expr: str = DEDUP_JOBS) -> dict[tuple[str, str, str], float]:
    return {
        (r["metric"]["queue"], r["metric"]["type"], r["metric"]["status"]): float(r["value"][1])
        for r in prom.query(expr)
    }


def exposes_samples(exposition: str, name: str) -> bool:
    return re.search(rf"^{name}[{{ ]", exposition, re.M) is not None


def describe(result: list[dict[str, Any]]) -> str:
    """A query result as ``{labels} value; ...`` (instance/job labels dropped), for the report."""
    parts = []
    for sample in sorted(result, key=lambda s: sorted(s["metric"].items())):
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample["metric"].items()) if k not in ("instance", "job"))
        value = float(sample["value"][1])
        shown = "NaN" if math.isnan(value) else f"{value:.4g}"
        parts.append(f"{{{labels}}} {shown}" if labels else shown)
    return "; ".join(parts) if parts else "(no data)"


@dataclass
class Listeners:
    """A WebSocket client and an SSE stream kept open during the load."""

    ws: aiohttp.ClientWebSocketResponse
    sse: aiohttp.ClientResponse
    ws_messages: list[dict[str, Any]] = field(default_factory=list)
    sse_frames: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def subscribe(self, job_id: str) -> None:
        await self.ws.send_str(json.dumps({"type": "subscribe", "jobId": job_id}))

    async def _read_ws(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.ws_messages.append(json.loads(msg.data))

    async def _read_sse(self) -> None:
        async for line in self.sse.content:
            if line.startswith(b"event: "):
                self.sse_frames.append(line[7:].decode().strip())

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._read_ws()), asyncio.create_task(self._read_sse())]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.sse.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@contextlib.asynccontextmanager
async def webhook_receiver() -> AsyncIterator[tuple[str, list[bytes], asyncio.Event]]:
    """A local endpoint answering 200 to every webhook: its URL, what it got, and an event set on arrival."""
    received: list[bytes] = []
    arrived = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        arrived.set()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}/hook", received, arrived
    finally:
        await runner.cleanup()


# --- the load ----------------------------------------------------------------------------------------


async def warm_up(apis: list[Api], hook_url: str, hook_arrived: asyncio.Event) -> None:
    """Jobs run before Prometheus starts, so that every (queue, type, status) series the load touches
    (and the webhook outcome series) exists from its first scrape: a series' first sample is not an
    increase, so rate() over the load would otherwise miss the first job of each kind."""
    warm = [
        await apis[0].submit("generate", {"seconds": 0, "ticks": 0}, type="sleep", webhookUrl=hook_url),
        await apis[1].submit("generate", {"seconds": 0, "ticks": 0, "fail": True}, type="sleep"),
        await apis[0].submit("generate", {"prompt": "fox", "width": 64, "height": 64, "steps": 1}),
        await apis[1].submit("train", {"name": "warm", "steps": 5}),
    ]
    for job in warm:
        await apis[0].wait(job["jobId"], timeout_s=60)
    cancel_me = await apis[0].submit("generate", {"seconds": 30, "ticks": 0}, type="sleep")
    await apis[0].wait(cancel_me["jobId"], until={"running"}, timeout_s=30)
    status, _, _ = await apis[1].call("DELETE", f"/api/jobs/{cancel_me['jobId']}")
    assert status == 200
    with contextlib.suppress(TimeoutError):  # webhooks, when this build sends them, arrive within a moment
        await asyncio.wait_for(hook_arrived.wait(), 5)


async def run_load(apis: list[Api], listeners: Listeners, hook_url: str) -> None:
    """Cancelled while running and while queued, then 8 sleep jobs (2 failing), an image and a lora."""
    blocker = await apis[1].submit("generate", {"seconds": 60, "ticks": 0}, type="sleep")
    await apis[0].wait(blocker["jobId"], until={"running"}, timeout_s=30)
    # both workers are busy now (the monitored job and the blocker): this one stays queued
    queued = await apis[0].submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    status, body, _ = await apis[1].call("POST", f"/api/jobs/{queued['jobId']}/cancel")
    assert status == 200 and body["status"] == "cancelled", body
    status, body, _ = await apis[0].call("DELETE", f"/api/jobs/{blocker['jobId']}")
    assert status == 200 and body["status"] == "cancelled", body

    jobs = [blocker, queued]
    for i in range(8):
        extra: dict[str, Any] = {"webhookUrl": hook_url} if i in (0, 3) else {}
        inp = {"seconds": (i % 4) / 10, "ticks": 2, "fail": i in (2, 5)}
        jobs.append(await apis[i % 2].submit("generate", inp, type="sleep", **extra))
    image = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2}
    jobs.append(await apis[0].submit("generate", image))
    jobs.append(await apis[1].submit("train", {"name": "fox", "steps": 20}))
    for job in jobs:
        await listeners.subscribe(job["jobId"])
    finals = [(await apis[i % 2].wait(job["jobId"], timeout_s=90))["status"] for i, job in enumerate(jobs)]
    assert sorted(finals) == sorted(["cancelled"] * 2 + ["failed"] * 2 + ["completed"] * 8), finals


async def check_job_counts(prom: PrometheusServer, stack: Stack, api_ports: list[int]) -> None:
    """What Prometheus sees (one copy of the cluster-wide counters) == the status events in SQL."""
    expected = await db_status_events(stack)
    await prom_wait(prom, lambda: prom_jobs(prom) == expected, 20, f"jobs_total == SQL {expected}")
    for port in api_ports:  # every API process exports the full cluster-wide counts
        assert prom_jobs(prom, f'orchestrator_jobs_total{{instance="127.0.0.1:{port}"}}') == expected, port

    by_status: dict[str, float] = {}
    for (_, _, s), n in expected.items():
        by_status[s] = by_status.get(s, 0.0) + n
    query = "sum by (status) (max without (instance, job) (orchestrator_jobs_total))"
    seen = {r["metric"]["status"]: float(r["value"][1]) for r in prom.query(query)}
    assert seen == by_status
    jobs_by_status = dict(await stack.rows("SELECT status, COUNT(*) FROM jobs GROUP BY status"))
    assert {s: float(n) for s, n in jobs_by_status.items() if s in FINAL} == {s: seen[s] for s in FINAL if s in seen}
    assert jobs_by_status.get("running") == 1  # the monitored job

    runs = await stack.rows(
        "SELECT queue, type, COUNT(*) FROM jobs "
        "WHERE started_at IS NOT NULL AND finished_at IS NOT NULL GROUP BY queue, type",
    )
    query = "sum by (queue, type) (max without (instance, job) (orchestrator_job_duration_seconds_count))"
    durations = {(r["metric"]["queue"], r["metric"]["type"]): float(r["value"][1]) for r in prom.query(query)}
    assert durations == {(q, t): float(n) for q, t, n in runs}


def evaluate_dashboard(prom: PrometheusServer, webhooks_on: bool) -> tuple[str, list[str]]:
    """Every dashboard query: the report lines, and the queries that returned no finite value."""
    lines: list[str] = []
    missing: list[str] = []
    for title, expr in load_dashboard().queries():
        result = prom.query(expr)
        shown = describe(result)
        if WEBHOOK_METRIC in expr and not webhooks_on and not result:
            shown += f" (NOTE: no API process exposes {WEBHOOK_METRIC} samples yet; not required)"
        elif not any(math.isfinite(float(s["value"][1])) for s in result):
            missing.append(f"{title}: {expr} -> {shown}")
        lines.append(f"- {title}: `{expr}` → {shown}")
    return "\n".join(["", "Dashboard queries and the values Prometheus returned:", *lines, ""]), missing


# --- the test ----------------------------------------------------------------------------------------


async def test_every_dashboard_query_returns_data_and_job_counts_match_the_database(
    stack: Stack, http: aiohttp.ClientSession, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if len(stack.apis) < 2:
        await in_thread(stack.start_api)
    api_ports = [port for _, port in stack.apis[:2]]
    await in_thread(stack.wait_for_workers, 2)
    key = (await stack.user(credits=10_000)).api_key
    apis = [Api(http, stack.url_of(i), key) for i in (0, 1)]

    async with contextlib.AsyncExitStack() as cleanup:
        hook_url, hooks_received, hook_arrived = await cleanup.enter_async_context(webhook_receiver())
        await warm_up(apis, hook_url, hook_arrived)

        prom = await in_thread(
            start_prometheus, {"api": [f"127.0.0.1:{port}" for port in api_ports]}, free_port(), tmp_path / "prom"
        )
        cleanup.push_async_callback(in_thread, prom.stop)
        await in_thread(prom.wait_for_targets, 30)
        up_samples = 'min(count_over_time(up{job="orchestrator-api"}[1m]))'
        await prom_wait(prom, lambda: (prom.value(up_samples) or 0) >= 3, 30, "3 scrapes of each API process")

        # A long job ticking every second, watched over SSE (API 0) and a WebSocket (API 1) throughout.
        monitor_id = (await apis[0].submit("generate", {"seconds": 300, "ticks": 300}, type="sleep"))["jobId"]
        cleanup.push_async_callback(apis[0].call, "DELETE", f"/api/jobs/{monitor_id}")
        live = await cleanup.enter_async_context(aiohttp.ClientSession())  # no total timeout
        ws = await live.ws_connect(stack.url_of(1) + "/ws", headers=apis[1].headers(), heartbeat=10)
        sse = await live.get(f"{stack.url_of(0)}/api/jobs/{monitor_id}/stream", headers=apis[0].headers())
        assert sse.status == 200
        listeners = Listeners(ws, sse)
        listeners.start()
        cleanup.push_async_callback(listeners.close)
        await listeners.subscribe(monitor_id)
        await apis[1].wait(monitor_id, until={"running"}, timeout_s=30)

        await run_load(apis, listeners, hook_url)

        # Settled. Wait (bounded) for pending webhook deliveries, then for a scrape of both API processes.
        deadline = time.monotonic() + 10
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                expositions = [(await client.get(f"{stack.url_of(i)}/metrics")).text for i in (0, 1)]
                webhooks_on = any(exposes_samples(e, WEBHOOK_METRIC) for e in expositions)
                if (len(hooks_received) >= 3 if webhooks_on else not hooks_received) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
        assert webhooks_on == bool(hooks_received), "webhook metric and deliveries disagree"
        settled = time.time()
        scraped_since = 'min(timestamp(up{job="orchestrator-api"}))'
        await prom_wait(prom, lambda: (prom.value(scraped_since) or 0) > settled + 0.5, 20, "a scrape after the load")

        await check_job_counts(prom, stack, api_ports)

        report, missing = await in_thread(evaluate_dashboard, prom, webhooks_on)
        with capsys.disabled():
            print(report)
        (tmp_path / "dashboard-values.md").write_text(report, encoding="utf-8")
        assert not missing, "queries without data:\n" + "\n".join(missing)

        # Exact values: gauges from RQ counted once, connection gauges summed over the API processes.
        titles = dict(load_dashboard().queries())
        running = {r["metric"]["queue"]: float(r["value"][1]) for r in prom.query(titles["Running jobs"])}
        assert running == {"generate": 1.0, "train": 0.0}
        depth = {r["metric"]["queue"]: float(r["value"][1]) for r in prom.query(titles["Queue depth"])}
        assert depth == {"generate": 0.0, "train": 0.0}
        assert prom.value(titles["WebSocket clients"]) == 1.0
        assert prom.value(titles["SSE clients"]) == 1.0
        assert (prom.value(titles["WebSocket messages per second"]) or 0) > 0
        assert listeners.ws_messages and "progress" in listeners.sse_frames
        if webhooks_on:
            assert (prom.value(titles["Webhook deliveries by outcome"]) or 0) > 0
