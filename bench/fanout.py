"""Benchmark of live fan-out: many WebSocket clients following jobs, against a bare broadcast.

    .venv/bin/python bench/fanout.py --quick    # 1,000 sockets, under a minute
    .venv/bin/python bench/fanout.py            # 10,000 sockets (a few minutes)

Starts its own Redis and `orchestrator serve` (SQLite, or Postgres with `--db postgres`), submits
J `sleep` jobs over HTTP and opens N sockets on /ws, socket i following job i mod J (N/J = 10 sockets per job, so 1,000
events/s become 10,000 messages/s). Events travel the real path: `--drivers` processes play the
worker processes: each builds the worker's runtime (queues.runtime.Runtime) and calls the lifecycle
exactly as `TaskContext.report` does in a worker (start the job, then `progress` events), so
each event is stored in SQL, logged and published in Redis, picked up by the API process's one
subscription and written to the sockets. The drivers emit at a fixed total rate (open loop, like
the `sleep` task: late events go out back to back). Why not `sleep` jobs on RQ workers: one
running job holds one worker, so 1,000 sockets over 100 jobs would need 100 worker processes on
2 cores; with 2 workers every event would go to N/2 sockets. `--real-workers` (on by default)
also runs 2 real RQ workers on 2 `sleep` jobs (500 ticks/s each) to show the rate the real
worker path reaches on its own.

Client sockets live in `--client-procs` processes (2 by default) so that the receiving side is
not the bottleneck. Latency = receive time - the event's `ts` (its store time, truncated to the
millisecond, so figures read up to 1 ms high). Then the same clients connect to a bare aiohttp
server (another process) that broadcasts the same messages from memory at the same rate.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from benchlib import (
    BenchDatabase,
    PySpy,
    attribute_ours,
    cpu_seconds,
    machine_notes,
    percentile,
    raise_nofile,
    rss_mib,
    stack,
)
from jobs import submit_many, wait_workers

CTX = mp.get_context("spawn")
SAMPLE_EVERY = 3
"""Every 3rd message a client receives is kept with its (jobId, seq) to split the latency at the
moment Redis delivered the event (see Tap)."""


class Tap:
    """A Redis subscriber in this process noting when each event was published (seen on the
    channel): stored->published is the store path, published->received the fan-out."""

    def __init__(self, redis_url: str) -> None:
        import threading

        import redis

        from orchestrator import keys

        self.seen: dict[tuple[str, int], float] = {}
        self.store: list[float] = []
        self.measuring = False
        self._r = redis.Redis.from_url(redis_url)
        self._ps = self._r.pubsub(ignore_subscribe_messages=True)
        self._ps.subscribe(keys.EVENTS_CHANNEL)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._ps.get_message(timeout=0.2)
            if msg is None or msg["type"] != "message":
                continue
            now = time.time()
            ev = orjson.loads(msg["data"])
            self.seen[(ev["jobId"], int(ev["seq"]))] = now
            if self.measuring and ev.get("type") == "progress":
                self.store.append((now - datetime.fromisoformat(ev["ts"]).timestamp()) * 1000)

    def split(self, recv: list[tuple[str, int, float]]) -> dict[str, float]:
        fan = [(r - self.seen[(j, q)]) * 1000 for j, q, r in recv if (j, q) in self.seen]
        return {
            "publishP50Ms": percentile(self.store, 50),
            "publishP99Ms": percentile(self.store, 99),
            "fanoutP50Ms": percentile(fan, 50),
            "fanoutP99Ms": percentile(fan, 99),
            "fanoutSamples": len(fan),
        }

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self._ps.close()
        self._r.close()


# ---- clients (one process holds many sockets) ------------------------------------------------------


def client_proc(conn: Any, url: str, key: str, jobs: list[str], first: int, count: int, total_jobs: int) -> None:
    raise_nofile(count + 1024)
    asyncio.run(_client(conn, url, key, jobs, first, count, total_jobs))


def gc_pauses() -> list[float]:
    """Record garbage-collection pauses (ms) of this process."""
    pauses: list[float] = []
    started = [0.0]

    def cb(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((time.perf_counter() - started[0]) * 1000)

    gc.callbacks.append(cb)
    return pauses


async def _client(conn: Any, url: str, key: str, jobs: list[str], first: int, count: int, total_jobs: int) -> None:
    loop = asyncio.get_running_loop()
    pauses = gc_pauses()
    st: dict[str, Any] = {
        "measuring": False,
        "lat": [],
        "recv": [],
        "n": 0,
        "subscribed": 0,
        "gaps": 0,
        "closed": 0,
        "errors": 0,
    }
    ts_cache: dict[str, float] = {}
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    sem = asyncio.Semaphore(64)

    def stamp(ts: str) -> float:
        v = ts_cache.get(ts)
        if v is None:
            if len(ts_cache) > 100_000:
                ts_cache.clear()
            v = ts_cache[ts] = datetime.fromisoformat(ts).timestamp()
        return v

    async def one(i: int) -> None:
        job = jobs[i % total_jobs]
        try:
            async with sem:
                # `key` is an API key (sent as a header) or a subscribe token (in the query, as browsers do)
                if key.startswith("st_"):
                    ws = await session.ws_connect(f"{url}/ws?jobId={job}&token={key}", max_msg_size=0)
                else:
                    ws = await session.ws_connect(
                        f"{url}/ws?jobId={job}", headers={"Authorization": f"Bearer {key}"}, max_msg_size=0
                    )
        except Exception:
            st["errors"] += 1
            return
        sockets.append(ws)
        last = -1
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.time()
            data = orjson.loads(msg.data)
            kind = data.get("type")
            if kind == "subscribed":
                st["subscribed"] += 1
                continue
            seq = data.get("seq")
            if isinstance(seq, int):
                if last >= 0 and seq != last + 1:
                    st["gaps"] += 1
                last = seq
            if st["measuring"] and kind == "progress":
                st["lat"].append((now - stamp(data["ts"])) * 1000)
                st["n"] += 1
                if st["n"] % SAMPLE_EVERY == 0:
                    st["recv"].append((data["jobId"], seq, now))
        if ws.close_code not in (None, 1000, 1001):
            st["closed"] += 1

    tasks = [asyncio.create_task(one(i)) for i in range(first, first + count)]
    try:
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd == "status":
                conn.send({"open": len(sockets), "subscribed": st["subscribed"], "errors": st["errors"]})
            elif cmd == "start":
                st["lat"], st["recv"], st["n"], st["measuring"] = [], [], 0, True
                # the clients are the instrument: no collector pauses while measuring (nothing here makes
                # cycles worth collecting; the sockets' objects are frozen out of the collector's sight)
                gc.collect()
                gc.freeze()
                gc.disable()
                pauses.clear()
                conn.send(time.time())
            elif cmd == "count":
                conn.send(st["n"])
            elif cmd == "stop":
                st["measuring"] = False
                gc.enable()
                conn.send(
                    {
                        "lat": st["lat"],
                        "recv": st["recv"],
                        "n": st["n"],
                        "gaps": st["gaps"],
                        "closed": st["closed"],
                        "gcMaxMs": max(pauses, default=0.0),
                    }
                )
            elif cmd == "close":
                break
    finally:
        for ws in sockets:
            await ws.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        conn.send("closed")


class Clients:
    """`procs` client processes sharing `n` sockets."""

    def __init__(self, procs: int, url: str, key: str, jobs: list[str], n: int) -> None:
        self.pipes: list[Any] = []
        self.procs: list[Any] = []
        share = -(-n // procs)
        for k in range(procs):
            first, count = k * share, min(share, n - k * share)
            parent, child = CTX.Pipe()
            p = CTX.Process(target=client_proc, args=(child, url, key, jobs, first, count, len(jobs)), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)
        self.n = n

    def ask(self, cmd: str) -> list[Any]:
        for p in self.pipes:
            p.send(cmd)
        return [p.recv() for p in self.pipes]

    def wait_subscribed(self, timeout_s: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        total: dict[str, int] = {}
        while time.monotonic() < deadline:
            res = self.ask("status")
            total = {k: sum(r[k] for r in res) for k in res[0]}
            if total["subscribed"] + total["errors"] >= self.n:
                return total
            time.sleep(0.5)
        raise TimeoutError(f"sockets not all subscribed after {timeout_s} s: {total}")

    def close(self) -> None:
        try:
            self.ask("close")
        except (EOFError, OSError):
            pass
        for p in self.procs:
            p.join(20)
            if p.is_alive():
                p.kill()


def measure(clients: Clients, run: Any, settle_s: float = 10) -> dict[str, Any]:
    """Start measuring on the clients, `run()` the load, wait until deliveries stop, collect."""
    starts = clients.ask("start")
    t0 = min(starts)
    load = run()
    # wait for the tail: until the received count stops growing (bounded)
    prev, deadline = -1, time.monotonic() + settle_s
    while time.monotonic() < deadline:
        time.sleep(0.3)
        n = sum(clients.ask("count"))
        if n == prev:
            break
        prev = n
    res = clients.ask("stop")
    lat = [x for r in res for x in r["lat"]]
    recv = [x for r in res for x in r["recv"]]
    n = sum(r["n"] for r in res)
    seconds = load["seconds"]
    return {
        "n": n,
        "seconds": seconds,
        "deliveredPerSec": n / seconds,
        "p50Ms": percentile(lat, 50),
        "p99Ms": percentile(lat, 99),
        "maxMs": max(lat) if lat else float("nan"),
        "gaps": sum(r["gaps"] for r in res),
        "clientGcMaxMs": max(r["gcMaxMs"] for r in res),
        "closedAbnormally": sum(r["closed"] for r in res),
        "t0": t0,
        "recv": recv,
        **{k: v for k, v in load.items() if k != "seconds"},
    }


# ---- drivers: the worker's report path --------------------------------------------------------------


def driver_proc(conn: Any, env: dict[str, str], jobs: list[str], name: str) -> None:
    os.environ.update(env)
    from orchestrator.core.views import iso
    from orchestrator.settings import Settings
    from queues.runtime import Runtime

    rt = Runtime(Settings())
    actor = f"worker:{name}"
    attempts: dict[str, int] = {}
    seqs: dict[str, int] = {}
    for j in jobs:
        job = rt.run_sync(rt.lifecycle.start(j, actor, name))
        attempts[j] = job.attempts if job is not None else 1
        seqs[j] = job.seq if job is not None else 2
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd == "exit":
            break
        rate, duration, path = cmd
        interval = 1.0 / rate
        store: list[float] = []
        per_job: dict[str, int] = defaultdict(int)
        i = 0
        t0 = time.perf_counter()
        end = t0 + duration
        while True:
            target = t0 + i * interval
            now = time.perf_counter()
            if target >= end or now >= end:
                break
            if target > now:
                time.sleep(target - now)
            j = jobs[i % len(jobs)]
            tick = i // len(jobs) + 1
            s = time.perf_counter()
            if path == "store":
                # what TaskContext.report does in a worker: store, log, publish
                applied = rt.run_sync(
                    rt.lifecycle.progress(
                        j, min(99.0, tick * 0.01), f"tick {tick}", {"tick": tick}, actor=actor, attempt=attempts[j]
                    )
                )
                seqs[j] = applied.event["seq"]
            else:
                # the bus alone (no SQL): what the gateway would get if the store kept up
                seqs[j] += 1
                event = {
                    "jobId": j,
                    "seq": seqs[j],
                    "type": "progress",
                    "status": "running",
                    "progress": min(99.0, tick * 0.01),
                    "message": f"tick {tick}",
                    "data": {"tick": tick},
                    "error": None,
                    "actor": actor,
                    "ts": iso(time.time()),
                    "etaSeconds": 12.34,
                }
                rt.run_sync(rt.bus.publish(event))
            store.append((time.perf_counter() - s) * 1000)
            per_job[j] += 1
            i += 1
        conn.send(
            {
                "events": i,
                "seconds": time.perf_counter() - t0,
                "perJob": dict(per_job),
                "storeP50Ms": percentile(store, 50),
                "storeP99Ms": percentile(store, 99),
            }
        )
    rt.close()


class Drivers:
    def __init__(self, count: int, env: dict[str, str], jobs: list[str]) -> None:
        self.pipes: list[Any] = []
        self.procs: list[Any] = []
        for k in range(count):
            parent, child = CTX.Pipe()
            share = jobs[k::count]
            p = CTX.Process(target=driver_proc, args=(child, env, share, f"bench-driver-{k}"), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)
        for p in self.pipes:
            if not p.poll(120):
                raise TimeoutError("driver did not start its jobs")
            p.recv()

    def run(self, rate: float, duration: float, path: str = "store") -> dict[str, Any]:
        for p in self.pipes:
            p.send((rate / len(self.pipes), duration, path))
        res = [p.recv() for p in self.pipes]
        per_job: dict[str, int] = {}
        for r in res:
            per_job.update(r["perJob"])
        events = sum(r["events"] for r in res)
        seconds = max(r["seconds"] for r in res)
        return {
            "events": events,
            "seconds": seconds,
            "eventsPerSec": events / seconds,
            "perJob": per_job,
            "storeP50Ms": max(r["storeP50Ms"] for r in res),
            "storeP99Ms": max(r["storeP99Ms"] for r in res),
        }

    def close(self) -> None:
        for p in self.pipes:
            try:
                p.send("exit")
            except OSError:
                pass
        for pr in self.procs:
            pr.join(20)
            if pr.is_alive():
                pr.kill()


# ---- the bare baseline: an aiohttp server broadcasting from memory ------------------------------------


def baseline_proc(conn: Any, port: int, nofile: int) -> None:
    raise_nofile(nofile)
    asyncio.run(_baseline(conn, port))


async def _baseline(conn: Any, port: int) -> None:
    from orchestrator.core.views import iso

    subs: dict[str, set[web.WebSocketResponse]] = defaultdict(set)
    pauses = gc_pauses()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        job = request.query.get("jobId", "")
        subs[job].add(ws)
        await ws.send_str(orjson.dumps({"type": "subscribed", "jobId": job}).decode())
        try:
            async for _ in ws:
                pass
        finally:
            subs[job].discard(ws)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    loop = asyncio.get_running_loop()
    conn.send(os.getpid())
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd == "exit":
            break
        rate, duration, jobs = cmd
        pauses.clear()
        interval = 1.0 / rate
        i = 0
        t0 = loop.time()
        end = t0 + duration
        while True:
            target = t0 + i * interval
            now = loop.time()
            if target >= end or now >= end:
                break
            if target > now:
                await asyncio.sleep(target - now)
            job = jobs[i % len(jobs)]
            tick = i // len(jobs) + 1
            event = {
                "jobId": job,
                "seq": 2 + tick,
                "type": "progress",
                "status": "running",
                "progress": min(99.0, tick * 0.01),
                "message": f"tick {tick}",
                "data": {"tick": tick},
                "error": None,
                "actor": "worker:bench-driver-0",
                "ts": iso(time.time()),
                "etaSeconds": 12.34,
            }
            payload = orjson.dumps(event).decode()
            for ws in list(subs.get(job, ())):
                await ws.send_str(payload)
            i += 1
        conn.send({"events": i, "seconds": loop.time() - t0, "serverGcMaxMs": max(pauses, default=0.0)})
    await runner.cleanup()


# ---- real workers: how fast the worker path itself reports ----------------------------------------------


async def real_worker_rate(st: Any, key: str, seconds: float, ticks: int) -> dict[str, Any]:
    """2 RQ workers each run a `sleep` job with `ticks` ticks over `seconds` (asking 2 * ticks / seconds events/s)."""
    for _ in range(2):
        st.start_worker()
    await asyncio.to_thread(wait_workers, st.redis.url, 2, "generate")
    ids = []
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(
                st.url + "/api/generate",
                json={"type": "sleep", "input": {"seconds": seconds, "ticks": ticks}},
                headers={"Authorization": f"Bearer {key}"},
            ) as r:
                ids.append((await r.json())["jobId"])
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)
    in_ids = ", ".join(f"'{i}'" for i in ids)
    deadline = time.monotonic() + seconds * 20 + 30
    while time.monotonic() < deadline:
        rows = await st.rows(f"SELECT count(*) FROM jobs WHERE id IN ({in_ids}) AND status = 'completed'")
        if rows[0][0] == 2:
            break
        await asyncio.sleep(0.25)
    row = (
        await st.rows(
            f"SELECT count(*), min(ts), max(ts) FROM job_events WHERE job_id IN ({in_ids}) AND type = 'progress'"
        )
    )[0]
    n, span = int(row[0]), float(row[2] - row[1]) if row[0] else 0.0
    for w in st.workers:
        w.terminate()
    for w in st.workers:
        await asyncio.to_thread(w.wait, 15)
    st.workers.clear()
    return {"events": n, "seconds": span, "eventsPerSec": n / span if span else 0.0, "asked": 2 * ticks / seconds}


# ---- the run -------------------------------------------------------------------------------------------


async def api_gc_pauses(url: str) -> dict[tuple[str, float], float]:
    """The API process's garbage-collection pauses so far: (generation, upper bound in s) → pauses
    of that generation at most that long."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[tuple[str, float], float] = {}
    pattern = r'^orchestrator_gc_pause_seconds_bucket\{generation="(\d)",le="([^"]+)"\} (\S+)$'
    for m in re.finditer(pattern, text, re.M):
        out[(m.group(1), float(m.group(2)))] = float(m.group(3))
    return out


def gc_summary(before: dict[tuple[str, float], float], after: dict[tuple[str, float], float]) -> dict[str, Any]:
    """Pauses between two readings: how many, how many over 10 ms, and the bound of the longest
    (in all, and per generation)."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

    def longest(gens: set[str]) -> float | None:
        per_le: dict[float, float] = defaultdict(float)
        for (g, le), n in delta.items():
            if g in gens:
                per_le[le] += n
        total = per_le.get(float("inf"), 0.0)
        if not total:
            return 0.0
        bound = min(le for le, n in per_le.items() if n >= total)
        return None if bound == float("inf") else round(bound * 1000, 1)

    total = sum(n for (_, le), n in delta.items() if le == float("inf"))
    within = sum(n for (_, le), n in delta.items() if le == 0.01)
    return {
        "apiGcPauses": int(total),
        "apiGcPausesOver10Ms": int(total - within),
        "apiGcMaxMsAtMost": longest({"0", "1", "2"}),
        "apiGcMaxMsAtMostByGeneration": {g: longest({g}) for g in ("0", "1", "2")},
    }


def api_rss_sampler(pid: int, stop: Any, out: list[float]) -> None:
    while not stop.is_set():
        out.append(rss_mib(pid))
        stop.wait(0.5)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.sockets or (1000 if args.quick else 10000)
    jobs_n = args.jobs or max(1, n // 10)
    rate = args.rate
    duration = args.seconds or (5.0 if args.quick else 20.0)
    soft, hard = raise_nofile(n + 4096)
    print(f"RLIMIT_NOFILE {soft}/{hard} (inherited by the API); {n} sockets over {jobs_n} jobs", flush=True)
    if soft < n + 200:
        raise SystemExit(f"RLIMIT_NOFILE {soft} is too low for {n} sockets")

    tmp = tempfile.TemporaryDirectory(prefix="bench-fanout-")
    root = Path(tmp.name)
    database = BenchDatabase(root, args.db)
    # No sweeper during the run: the drivers' jobs have no RQ attempt running and would be "lost".
    st = stack(root, {"ORCH_SWEEP_INTERVAL": "3600", "ORCH_REQUEUE_AFTER": "1000000"}, database.url)
    clients: Clients | None = None
    drivers: Drivers | None = None
    base: Any = None
    out: dict[str, Any] = {}
    try:
        st.start(0, 1)  # in the main thread: children die with the thread that started them
        api_pid = st.apis[0][0].pid
        user = await st.user(credits=10**9, name="bench-fanout")
        real: dict[str, Any] = {}
        if args.real_workers:
            ticks = 500 if args.quick else 1000
            real = await real_worker_rate(st, user.api_key, ticks / 500, ticks)
            print(
                f"real workers: 2 sleep jobs x {ticks} ticks asking {real['asked']:.0f} events/s -> "
                f"{real['eventsPerSec']:.0f} events/s stored",
                flush=True,
            )
        # jobs, then the drivers start them (running) before any socket connects
        t = time.monotonic()
        await submit_many(st.url, user.api_key, jobs_n)
        job_ids = await queued_ids(st, user.user_id)
        drivers = await asyncio.to_thread(Drivers, args.drivers, st.env, job_ids)
        print(f"{len(job_ids)} jobs submitted and started in {time.monotonic() - t:.1f} s", flush=True)

        rss_before = rss_mib(api_pid)
        gc0 = await api_gc_pauses(st.url)
        t = time.monotonic()
        credential = user.api_key
        if args.auth == "token":
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    st.url + "/api/tokens",
                    json={"ttlSeconds": 3600},
                    headers={"Authorization": f"Bearer {user.api_key}"},
                ) as r,
            ):
                credential = (await r.json())["token"]
        clients = Clients(args.client_procs, st.url, credential, job_ids, n)
        status = await asyncio.to_thread(clients.wait_subscribed, 60 if args.quick else 400)
        connect_s = time.monotonic() - t
        await asyncio.sleep(2)
        rss_idle = rss_mib(api_pid)
        print(
            f"{status['subscribed']} sockets subscribed in {connect_s:.1f} s (errors {status['errors']}); "
            f"API RSS {rss_before:.0f} -> {rss_idle:.0f} MiB",
            flush=True,
        )
        import threading

        samples: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=api_rss_sampler, args=(api_pid, stop, samples), daemon=True)
        sampler.start()
        d = drivers
        tap = Tap(st.redis.url)
        pids = {
            "api": [api_pid],
            "drivers": [p.pid for p in drivers.procs],
            "clients": [p.pid for p in clients.procs],
            "redis": [st.redis.proc.pid],
        }
        cpu0 = {k: [cpu_seconds(p) for p in v] for k, v in pids.items()}
        tap.measuring = True
        dspy = PySpy(drivers.procs[0].pid, Path(args.profile) / "driver-store.txt", rate=250) if args.profile else None
        m = await asyncio.to_thread(measure, clients, lambda: d.run(rate, duration))
        dprof = dspy.stop() if dspy else None
        tap.measuring = False
        cpu = {k: round(sum(cpu_seconds(p) for p in v) - sum(cpu0[k]), 2) for k, v in pids.items()}
        split = tap.split(m.pop("recv"))
        tap.close()
        stop.set()
        sampler.join()
        per_job = m.pop("perJob")
        sockets_of: dict[str, int] = defaultdict(int)
        for i in range(n):
            sockets_of[job_ids[i % len(job_ids)]] += 1
        expected = sum(c * sockets_of[j] for j, c in per_job.items())
        print(
            f"orchestrator: {m['events']} events in {m['seconds']:.1f} s = {m['eventsPerSec']:.0f}/s stored "
            f"(store p50 {m['storeP50Ms']:.1f} ms, p99 {m['storeP99Ms']:.1f} ms); delivered {m['n']}/{expected} "
            f"= {m['deliveredPerSec']:.0f} msg/s; stored->received p50 {m['p50Ms']:.1f} ms, p99 {m['p99Ms']:.1f} ms, "
            f"max {m['maxMs']:.0f} ms; gaps {m['gaps']}, abnormal closes {m['closedAbnormally']}; "
            f"client GC max {m['clientGcMaxMs']:.0f} ms; API RSS peak {max(samples, default=rss_idle):.0f} MiB",
            flush=True,
        )
        print(
            f"  split at Redis: stored->published p50 {split['publishP50Ms']:.1f} "
            f"/ p99 {split['publishP99Ms']:.1f} ms, "
            f"published->received p50 {split['fanoutP50Ms']:.1f} / p99 {split['fanoutP99Ms']:.1f} ms "
            f"({split['fanoutSamples']} samples); CPU seconds over the {m['seconds']:.0f} s load: {cpu}",
            flush=True,
        )
        # the gateway alone at the asked rate: events published on the bus as the lifecycle does,
        # without the SQL store in front (seq numbers continue the stored ones)
        g: dict[str, Any] = {}
        if args.gateway_phase:
            gcpu0 = cpu_seconds(api_pid)
            spy = PySpy(api_pid, Path(args.profile) / "api-gateway.txt", rate=500) if args.profile else None
            g = await asyncio.to_thread(measure, clients, lambda: d.run(rate, duration, "bus"))
            prof = spy.stop() if spy else None
            g.pop("recv")
            g["apiCpu"] = cpu_seconds(api_pid) - gcpu0
            print(
                f"gateway alone (bus publish, no SQL): {g['events']} events = {g['eventsPerSec']:.0f}/s; delivered "
                f"{g['n']} = {g['deliveredPerSec']:.0f} msg/s; p50 {g['p50Ms']:.1f} ms, p99 {g['p99Ms']:.1f} ms, "
                f"max {g['maxMs']:.0f} ms; gaps {g['gaps']}, abnormal closes {g['closedAbnormally']}; "
                f"client GC max {g['clientGcMaxMs']:.0f} ms; "
                f"API CPU {g['apiCpu']:.1f} s",
                flush=True,
            )
            if prof:
                print("profile of the API process during the gateway-alone phase (py-spy):")
                print(attribute_ours(prof, top=25), flush=True)
        gcs = gc_summary(gc0, await api_gc_pauses(st.url))
        print(
            f"API garbage collection while holding the sockets: {gcs['apiGcPauses']} pauses, "
            f"{gcs['apiGcPausesOver10Ms']} over 10 ms, the longest at most {gcs['apiGcMaxMsAtMost']} ms "
            f"(by generation: {gcs['apiGcMaxMsAtMostByGeneration']})",
            flush=True,
        )
        if dprof:
            print("profile of one driver (the worker's report path) during the stored phase (py-spy):")
            print(attribute_ours(dprof, top=20), flush=True)
        await asyncio.to_thread(clients.close)
        clients = None
        drivers.close()
        drivers = None

        # the bare broadcast, same sockets, same jobs, same rate and duration
        from orchestrator.dev.redis_server import free_port

        port = free_port()
        parent, child = CTX.Pipe()
        base = CTX.Process(target=baseline_proc, args=(child, port, n + 4096), daemon=True)
        base.start()
        base_pid = parent.recv()
        clients = Clients(args.client_procs, f"http://127.0.0.1:{port}", "", job_ids, n)
        await asyncio.to_thread(clients.wait_subscribed, 60 if args.quick else 400)
        await asyncio.sleep(1)
        base_rss = rss_mib(base_pid)

        def bare_run() -> dict[str, Any]:
            parent.send((rate, duration, job_ids))
            r: dict[str, Any] = parent.recv()
            r["eventsPerSec"] = r["events"] / r["seconds"]
            return r

        bcpu0 = cpu_seconds(base_pid)
        b = await asyncio.to_thread(measure, clients, bare_run)
        b.pop("recv")
        bcpu = cpu_seconds(base_pid) - bcpu0
        print(
            f"bare broadcast: {b['events']} events = {b['eventsPerSec']:.0f}/s; delivered {b['n']} = "
            f"{b['deliveredPerSec']:.0f} msg/s; p50 {b['p50Ms']:.1f} ms, p99 {b['p99Ms']:.1f} ms; "
            f"server RSS {base_rss:.0f} MiB, server CPU {bcpu:.1f} s; GC max: server {b['serverGcMaxMs']:.0f} ms, "
            f"client {b['clientGcMaxMs']:.0f} ms",
            flush=True,
        )
        out = {
            "sockets": status["subscribed"],
            "jobs": len(job_ids),
            "eventsPerSec": round(m["eventsPerSec"], 1),
            "eventsAsked": rate,
            "p50Ms": round(m["p50Ms"], 2),
            "p99Ms": round(m["p99Ms"], 2),
            "baselineP50Ms": round(b["p50Ms"], 2),
            "baselineP99Ms": round(b["p99Ms"], 2),
            "deliveredPerSec": round(m["deliveredPerSec"], 1),
            "baselineDeliveredPerSec": round(b["deliveredPerSec"], 1),
            "deliveredRatio": round(m["deliveredPerSec"] / b["deliveredPerSec"], 3) if b["deliveredPerSec"] else None,
            "delivered": m["n"],
            "expected": expected,
            "gaps": m["gaps"],
            "rssMiB": round(rss_idle, 1),
            "rssBeforeSocketsMiB": round(rss_before, 1),
            "rssPeakMiB": round(max(samples, default=rss_idle), 1),
            "baselineRssMiB": round(base_rss, 1),
            "storeP99Ms": round(m["storeP99Ms"], 2),
            "publishP99Ms": round(split["publishP99Ms"], 2),
            "fanoutP50Ms": round(split["fanoutP50Ms"], 2),
            "fanoutP99Ms": round(split["fanoutP99Ms"], 2),
            "cpuSeconds": cpu,
            "realWorkerEventsPerSec": round(real["eventsPerSec"], 1) if real else None,
            "gatewayOnly": {
                "eventsPerSec": round(g["eventsPerSec"], 1),
                "p50Ms": round(g["p50Ms"], 2),
                "p99Ms": round(g["p99Ms"], 2),
                "deliveredPerSec": round(g["deliveredPerSec"], 1),
                "apiCpuSeconds": round(g["apiCpu"], 2),
            }
            if g
            else None,
            "connectSeconds": round(connect_s, 1),
            **gcs,
            "db": args.db,
            "auth": args.auth,
            "clientProcs": args.client_procs,
            "drivers": args.drivers,
            "seconds": duration,
            "quick": args.quick,
            **machine_notes(),
        }
    finally:
        if clients is not None:
            await asyncio.to_thread(clients.close)
        if drivers is not None:
            drivers.close()
        if base is not None:
            try:
                parent.send("exit")
            except OSError:
                pass
            base.join(10)
            if base.is_alive():
                base.kill()
        st.stop()
        database.stop()
        tmp.cleanup()
    return out


async def queued_ids(st: Any, user_id: str) -> list[str]:
    assert re.fullmatch(r"[A-Za-z0-9_-]+", user_id)
    rows = await st.rows(f"SELECT id FROM jobs WHERE user_id = '{user_id}' AND status = 'queued' ORDER BY created_at")
    return [r[0] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 sockets, under a minute")
    ap.add_argument("--sockets", type=int, default=0, help="sockets (default 1,000 quick, 10,000 full)")
    ap.add_argument("--jobs", type=int, default=0, help="jobs followed (default sockets / 10)")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite", help="the store")
    ap.add_argument(
        "--auth",
        choices=("token", "key"),
        default="token",
        help="sockets authenticate with one subscribe token (as browsers do) or the API key",
    )
    ap.add_argument("--rate", type=float, default=1000.0, help="events per second asked of the drivers")
    ap.add_argument("--seconds", type=float, default=0.0, help="length of the measured load")
    ap.add_argument("--drivers", type=int, default=2, help="processes reporting events (like workers)")
    ap.add_argument("--client-procs", type=int, default=2, help="processes holding the client sockets")
    ap.add_argument("--no-real-workers", dest="real_workers", action="store_false", help="skip the RQ sleep phase")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the API during the gateway phase, raw output in DIR")
    ap.add_argument(
        "--no-gateway-phase", dest="gateway_phase", action="store_false", help="skip the bus-only (no SQL) phase"
    )
    args = ap.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
