"""Benchmark of the job path: submits over HTTP and end-to-end jobs, against bare RQ.

    .venv/bin/python bench/jobs.py --quick      # under a minute
    .venv/bin/python bench/jobs.py              # longer, steadier figures
    .venv/bin/python bench/jobs.py --profile    # also py-spy profiles of the API and a worker

Starts its own Redis, `orchestrator serve` and `orchestrator worker` processes (SQLite), then in
one run measures:

(a) POST /api/generate {"type": "sleep", "input": {"seconds": 0, "ticks": 0}} from 32 concurrent
    keep-alive aiohttp clients, no workers running (the jobs only queue): submits/s, p50/p99;
(b) a bare `rq.Queue.enqueue` loop of the same number of no-op jobs on the same Redis;
(c) end to end: 2 `orchestrator worker` processes; the same 32 clients submit N sleep jobs and we
    wait until every one is `completed` (read from SQLite every 0.1 s, read-only);
    rate = N / (last finishedAt - first submit);
(d) 2 bare RQ workers of the class ours derives from (`SimpleWorker` for our warm workers, `Worker`
    for a fork per job) draining N no-op jobs: rate = N / (last ended_at - first enqueue).

(c) and (d) also report CPU seconds per job of the worker process trees (`workerCpuMsPerJob`,
`baselineWorkerCpuMsPerJob`), and (c) the API's (`apiCpuMsPerJob`).

`--db postgres` runs the stack on a throwaway Postgres 15 cluster instead of SQLite.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import (
    ROOT,
    BenchDatabase,
    PySpy,
    attribute_ours,
    machine_notes,
    percentile,
    stack,
    thread_cpu,
    thread_cpu_delta,
    tree_cpu_seconds,
)
from redis import Redis
from rq import Queue, Worker
from rq.job import Job as RQJob
from rq.registry import FinishedJobRegistry

from orchestrator.states import FINAL

CLIENTS = 32
SLEEP_JOB = {"type": "sleep", "input": {"seconds": 0, "ticks": 0}}
BARE_QUEUE = "bench-bare"
NOOP_QUEUE = "bench-noop"
NOOP = "benchnoop.noop"


# ---- (a) and (c): submits over HTTP --------------------------------------------------------------


async def submit_many(url: str, key: str, n: int, clients: int = CLIENTS, deadline_s: float = 120) -> dict[str, Any]:
    """`n` submits from `clients` keep-alive clients; latencies in ms."""
    latencies: list[float] = []
    errors = 0
    left = n
    stop_at = time.monotonic() + deadline_s
    headers = {"Authorization": f"Bearer {key}"}
    body = json.dumps(SLEEP_JOB).encode()

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal left, errors
        while left > 0 and time.monotonic() < stop_at:
            left -= 1
            t0 = time.perf_counter()
            async with session.post(
                url + "/api/generate", data=body, headers={**headers, "Content-Type": "application/json"}
            ) as r:
                await r.read()
                if r.status != 202:
                    errors += 1
                    continue
            latencies.append((time.perf_counter() - t0) * 1000)

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return {
        "n": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "perSec": len(latencies) / elapsed if elapsed else 0.0,
        "p50Ms": percentile(latencies, 50),
        "p99Ms": percentile(latencies, 99),
    }


# ---- (b) and (d): bare RQ -------------------------------------------------------------------------


def bare_enqueue(redis_url: str, queue: str, n: int) -> dict[str, Any]:
    conn = Redis.from_url(redis_url)
    q = Queue(queue, connection=conn)
    lat: list[float] = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        q.enqueue(NOOP)
        lat.append((time.perf_counter() - t) * 1000)
    elapsed = time.perf_counter() - t0
    conn.close()
    return {
        "n": n,
        "seconds": elapsed,
        "perSec": n / elapsed,
        "p50Ms": percentile(lat, 50),
        "p99Ms": percentile(lat, 99),
        "t0": time.time() - elapsed,
    }


def our_worker_class() -> str:
    """The RQ worker class ours derives from (`SimpleWorker`: jobs in the worker's own process, or
    `Worker`: a forked work horse per job), so the baseline runs the same class."""
    from rq import SimpleWorker

    from queues import worker as worker_mod

    ours = getattr(worker_mod, "OrchestratorWorker", None)
    return "SimpleWorker" if isinstance(ours, type) and issubclass(ours, SimpleWorker) else "Worker"


def start_bare_workers(redis_url: str, count: int, root: Path, cls: str) -> list[subprocess.Popen[bytes]]:
    code = (
        f"import sys; from redis import Redis; from rq import Queue, {cls}; "
        "c = Redis.from_url(sys.argv[1]); "
        f"{cls}([Queue({NOOP_QUEUE!r}, connection=c)], connection=c).work(logging_level='WARNING')"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bench"))
    procs = []
    for i in range(count):
        log = open(root / f"bare-worker-{i}.log", "ab")
        procs.append(
            subprocess.Popen([sys.executable, "-c", code, redis_url], env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    return procs


def wait_workers(redis_url: str, count: int, queue: str, timeout_s: float = 30) -> None:
    conn = Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ws = [w for w in Worker.all(connection=conn) if queue in w.queue_names()]
        if len(ws) >= count and all(w.get_state() == "idle" for w in ws):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{count} workers on {queue} not idle after {timeout_s} s")


def stop_procs(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def bare_e2e(redis_url: str, n: int, deadline_s: float) -> dict[str, Any]:
    conn = Redis.from_url(redis_url)
    q = Queue(NOOP_QUEUE, connection=conn)
    reg = FinishedJobRegistry(NOOP_QUEUE, connection=conn)
    t0 = time.time()
    ids = [q.enqueue(NOOP).id for _ in range(n)]
    deadline = time.monotonic() + deadline_s
    while reg.count < n and time.monotonic() < deadline:
        time.sleep(0.05)
    jobs = [j for j in RQJob.fetch_many(ids, connection=conn) if j is not None and j.ended_at is not None]
    done = len(jobs)
    end = max(j.ended_at.timestamp() for j in jobs) if jobs else time.time()
    perform = [(j.ended_at - j.started_at).total_seconds() * 1000 for j in jobs if j.started_at]
    conn.close()
    return {
        "n": done,
        "seconds": end - t0,
        "perSec": done / (end - t0),
        "performP50Ms": percentile(perform, 50),
    }


# ---- (c) completion, read from the database ------------------------------------------------------


async def db_counts(db: BenchDatabase, user_id: str) -> tuple[int, int]:
    rows = await db.rows(
        "SELECT status, count(*) FROM jobs WHERE user_id = :u GROUP BY status",
        {"u": user_id},
    )
    by = {str(r[0]): int(r[1]) for r in rows}
    return sum(by.get(s, 0) for s in FINAL), by.get("completed", 0)


async def db_timings(db: BenchDatabase, user_id: str) -> tuple[float, float, list[float]]:
    rows = await db.rows(
        "SELECT created_at, started_at, finished_at FROM jobs WHERE user_id = :u AND status = 'completed'",
        {"u": user_id},
    )
    first = min(r[0] for r in rows)
    last = max(r[2] for r in rows)
    return first, last, [(r[2] - r[0]) * 1000 for r in rows]


async def e2e(stack_url: str, key: str, user_id: str, db: BenchDatabase, n: int, deadline_s: float) -> dict[str, Any]:
    t0 = time.time()
    sub = await submit_many(stack_url, key, n, deadline_s=deadline_s)
    deadline = time.monotonic() + deadline_s
    final = completed = 0
    while time.monotonic() < deadline:
        final, completed = await db_counts(db, user_id)
        if final >= sub["n"]:
            break
        await asyncio.sleep(0.1)
    _first, last, lat = await db_timings(db, user_id)
    return {
        "n": completed,
        "final": final,
        "seconds": last - t0,
        "perSec": completed / (last - t0),
        "submitPerSec": sub["perSec"],
        "latencyP50Ms": percentile(lat, 50),
        "latencyP99Ms": percentile(lat, 99),
    }


# ---- the run --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    n_submit = args.submits or (1500 if quick else 8000)
    n_e2e = args.jobs or (300 if quick else 2000)
    e2e_deadline = 60 if quick else 240
    tmp = tempfile.TemporaryDirectory(prefix="bench-jobs-")
    root = Path(tmp.name)
    db = BenchDatabase(root, args.db)
    # No re-enqueue of the jobs of (a), which we drop from RQ before (c).
    st = stack(root, {"ORCH_REQUEUE_AFTER": "1000000"}, db.url)
    st.api_args = ["--processes", str(args.api_processes)]
    bare: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {}
    worker_cls = our_worker_class()
    try:
        # In this (main) thread: the children die with the thread that started them (PR_SET_PDEATHSIG).
        st.start(0, 1)
        assert st.redis is not None
        redis_url = st.redis.url
        api_pid = st.apis[0][0].pid
        u_submit = await st.user(credits=10**9, name="bench-submit")
        u_e2e = await st.user(credits=10**9, name="bench-e2e")

        # (a) submits over HTTP, no workers
        await submit_many(st.url, u_submit.api_key, 100)  # warm-up (connections, caches)
        a = await submit_many(st.url, u_submit.api_key, n_submit)
        print(
            f"(a) HTTP submits, {CLIENTS} clients: {a['n']} in {a['seconds']:.2f} s = {a['perSec']:.0f}/s, "
            f"p50 {a['p50Ms']:.1f} ms, p99 {a['p99Ms']:.1f} ms, errors {a['errors']}",
            flush=True,
        )
        # (b) bare enqueue, same Redis, same count
        await asyncio.to_thread(bare_enqueue, redis_url, BARE_QUEUE, 100)
        b = await asyncio.to_thread(bare_enqueue, redis_url, BARE_QUEUE, n_submit)
        print(
            f"(b) bare Queue.enqueue loop: {b['n']} in {b['seconds']:.2f} s = {b['perSec']:.0f}/s, "
            f"p50 {b['p50Ms']:.2f} ms, p99 {b['p99Ms']:.2f} ms",
            flush=True,
        )
        conn = Redis.from_url(redis_url)
        for qn in ("generate", BARE_QUEUE):
            Queue(qn, connection=conn).empty()

        # (c) end to end with 2 orchestrator workers
        for _ in range(2):
            st.start_worker()
        await asyncio.to_thread(wait_workers, redis_url, 2, "generate")
        worker_pids = [p.pid for p in st.workers]
        cpu0 = sum(tree_cpu_seconds(p) for p in worker_pids)
        api_cpu0 = tree_cpu_seconds(api_pid)  # the serve supervisor and its API processes
        spy = PySpy(worker_pids[0], root / "worker.txt", subprocesses=True, rate=250) if args.profile else None
        c = await e2e(st.url, u_e2e.api_key, u_e2e.user_id, db, n_e2e, e2e_deadline)
        worker_cpu = sum(tree_cpu_seconds(p) for p in worker_pids) - cpu0
        api_cpu = tree_cpu_seconds(api_pid) - api_cpu0
        c_ms = 1000 * worker_cpu / max(1, c["n"])
        print(
            f"(c) end to end, 2 orchestrator workers: {c['n']}/{n_e2e} completed in {c['seconds']:.2f} s = "
            f"{c['perSec']:.1f}/s (submit->completed p50 {c['latencyP50Ms']:.0f} ms); "
            f"worker CPU {c_ms:.2f} ms/job, API CPU {1000 * api_cpu / max(1, c['n']):.2f} ms/job",
            flush=True,
        )
        if spy is not None and (path := spy.stop()):
            print("\nprofile: an orchestrator worker during (c)")
            print(attribute_ours(path, top=16))
        rq_perf = horse_times(conn, "generate")
        await asyncio.to_thread(stop_procs, st.workers)
        st.workers.clear()

        # (d) bare RQ workers, same class and count, no-op jobs
        bare = start_bare_workers(redis_url, 2, root, worker_cls)
        await asyncio.to_thread(wait_workers, redis_url, 2, NOOP_QUEUE)
        bcpu0 = sum(tree_cpu_seconds(p.pid) for p in bare)
        d = await asyncio.to_thread(bare_e2e, redis_url, n_e2e, e2e_deadline)
        d_ms = 1000 * (sum(tree_cpu_seconds(p.pid) for p in bare) - bcpu0) / max(1, d["n"])
        print(
            f"(d) bare rq.{worker_cls} x2 draining no-op jobs: {d['n']}/{n_e2e} in {d['seconds']:.2f} s = "
            f"{d['perSec']:.1f}/s (perform p50 {d['performP50Ms']:.2f} ms; ours {rq_perf:.2f} ms); "
            f"worker CPU {d_ms:.2f} ms/job",
            flush=True,
        )
        await asyncio.to_thread(stop_procs, bare)
        bare = []

        out = {
            "submitPerSec": round(a["perSec"], 1),
            "submitP50Ms": round(a["p50Ms"], 2),
            "submitP99Ms": round(a["p99Ms"], 2),
            "submitBaselinePerSec": round(b["perSec"], 1),
            "submitRatio": round(a["perSec"] / b["perSec"], 3),
            "e2ePerSec": round(c["perSec"], 2),
            "e2eBaselinePerSec": round(d["perSec"], 2),
            "e2eRatio": round(c["perSec"] / d["perSec"], 3),
            "e2eLatencyP50Ms": round(c["latencyP50Ms"], 1),
            "horsePerformP50Ms": round(rq_perf, 2),
            "baselineHorsePerformP50Ms": round(d["performP50Ms"], 2),
            "workerCpuMsPerJob": round(c_ms, 2),
            "baselineWorkerCpuMsPerJob": round(d_ms, 2),
            "apiCpuMsPerJob": round(1000 * api_cpu / max(1, c["n"]), 2),
            "workerClass": worker_cls,
            "apiProcesses": args.api_processes,
            "db": args.db,
            "submits": a["n"],
            "jobs": c["n"],
            "quick": quick,
            **machine_notes(),
        }

        if args.profile:
            await profile(st, root, u_submit.api_key, api_pid, quick, args.keep)
    finally:
        stop_procs(bare)
        st.stop()
        db.stop()
        if args.keep:
            print(f"(kept {root})", file=sys.stderr)
        else:
            tmp.cleanup()
    return out


def horse_times(conn: Redis, queue: str) -> float:
    """Median time RQ saw each orchestrator job perform (start, run, complete)."""
    reg = FinishedJobRegistry(queue, connection=conn)
    ids = reg.get_job_ids()
    jobs = [j for j in RQJob.fetch_many(ids, connection=conn) if j is not None and j.started_at and j.ended_at]
    return percentile([(j.ended_at - j.started_at).total_seconds() * 1000 for j in jobs], 50)


async def profile(st: Any, root: Path, key: str, api_pid: int, quick: bool, keep: bool) -> None:
    """Where the API's time goes under submit load: py-spy --gil and CPU per thread."""
    env_dir = os.environ.get("BENCH_PROFILE_DIR")
    prof_dir = Path(env_dir) if env_dir else root / "profiles"
    prof_dir.mkdir(parents=True, exist_ok=True)
    n = 800 if quick else 3000
    for clients in (1, CLIENTS):
        spy = PySpy(api_pid, prof_dir / f"api-submit-{clients}.txt", rate=250, gil=True)
        await asyncio.sleep(1)
        before = thread_cpu(api_pid)
        r = await submit_many(st.url, key, n if clients > 1 else n // 2, clients=clients)
        cpu = thread_cpu_delta(before, thread_cpu(api_pid))
        path = spy.stop()
        per = {k: 1000 * v / max(1, r["n"]) for k, v in cpu.items()}
        print(
            f"\nprofile: API, {clients} client(s): {r['perSec']:.0f}/s, "
            f"p50 {r['p50Ms']:.1f} ms, p99 {r['p99Ms']:.1f} ms;"
            f" API CPU per submit: event-loop thread {per['mainUser']:.2f} user + {per['mainSys']:.2f} sys ms,"
            f" other threads {per['otherUser']:.2f} + {per['otherSys']:.2f} ms"
        )
        if path:
            print(attribute_ours(path, top=16))
    kept = env_dir or keep
    print(f"(raw py-spy profiles in {prof_dir})" if kept else "(raw py-spy profiles: set BENCH_PROFILE_DIR or --keep)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="under a minute")
    ap.add_argument("--profile", action="store_true", help="py-spy the API and a worker after the figures")
    ap.add_argument("--submits", type=int, default=0, help="jobs submitted in (a) and enqueued in (b)")
    ap.add_argument("--jobs", type=int, default=0, help="jobs run end to end in (c) and (d)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, profiles)")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite", help="the database to run on")
    ap.add_argument(
        "--api-processes",
        type=int,
        default=os.cpu_count() or 1,
        help="`serve --processes N`, one per core by default as `orchestrator dev` starts",
    )
    args = ap.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
