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
(d) 2 bare `rq.Worker` processes (fork per job, like ours) draining N no-op jobs:
    rate = N / (last ended_at - first enqueue).

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import ROOT, PySpy, attribute_ours, machine_notes, percentile, stack, thread_cpu, thread_cpu_delta
from redis import Redis
from rq import Queue, Worker
from rq.job import Job as RQJob
from rq.registry import FinishedJobRegistry

CLIENTS = 32
SLEEP_JOB = {"type": "sleep", "input": {"seconds": 0, "ticks": 0}}
BARE_QUEUE = "bench-bare"
NOOP_QUEUE = "bench-noop"
NOOP = "benchnoop.noop"
FINAL = ("completed", "failed", "cancelled", "timed_out")


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


def start_bare_workers(redis_url: str, count: int, root: Path) -> list[subprocess.Popen[bytes]]:
    code = (
        "import sys; from redis import Redis; from rq import Queue, Worker; "
        "c = Redis.from_url(sys.argv[1]); "
        f"Worker([Queue({NOOP_QUEUE!r}, connection=c)], connection=c).work(logging_level='WARNING')"
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


# ---- (c) completion, read from SQLite -------------------------------------------------------------


def db_counts(db_path: Path, user_id: str) -> tuple[int, int]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        q = "SELECT count(*) FROM jobs WHERE user_id = ? AND status IN ({})".format(",".join("?" * len(FINAL)))
        final = con.execute(q, (user_id, *FINAL)).fetchone()[0]
        completed = con.execute(
            "SELECT count(*) FROM jobs WHERE user_id = ? AND status = 'completed'", (user_id,)
        ).fetchone()[0]
        return int(final), int(completed)
    finally:
        con.close()


def db_timings(db_path: Path, user_id: str) -> tuple[float, float, list[float]]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute(
            "SELECT created_at, started_at, finished_at FROM jobs WHERE user_id = ? AND status = 'completed'",
            (user_id,),
        ).fetchall()
    finally:
        con.close()
    first = min(r[0] for r in rows)
    last = max(r[2] for r in rows)
    return first, last, [(r[2] - r[0]) * 1000 for r in rows]


def table_name(db_path: Path) -> None:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()
    if "jobs" not in names:
        raise SystemExit(f"no `jobs` table in {db_path} (tables: {sorted(names)})")


async def e2e(stack_url: str, key: str, user_id: str, db_path: Path, n: int, deadline_s: float) -> dict[str, Any]:
    t0 = time.time()
    sub = await submit_many(stack_url, key, n, deadline_s=deadline_s)
    deadline = time.monotonic() + deadline_s
    final = completed = 0
    while time.monotonic() < deadline:
        final, completed = await asyncio.to_thread(db_counts, db_path, user_id)
        if final >= sub["n"]:
            break
        await asyncio.sleep(0.1)
    _first, last, lat = await asyncio.to_thread(db_timings, db_path, user_id)
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
    n_e2e = args.jobs or (150 if quick else 1000)
    e2e_deadline = 25 if quick else 240
    tmp = tempfile.TemporaryDirectory(prefix="bench-jobs-")
    root = Path(tmp.name)
    # No re-enqueue of the jobs of (a), which we drop from RQ before (c).
    st = stack(root, {"ORCH_REQUEUE_AFTER": "1000000"})
    bare: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {}
    try:
        # In this (main) thread: the children die with the thread that started them (PR_SET_PDEATHSIG).
        st.start(0, 1)
        assert st.redis is not None
        redis_url = st.redis.url
        db_path = root / "orchestrator.db"
        table_name(db_path)
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
        c = await e2e(st.url, u_e2e.api_key, u_e2e.user_id, db_path, n_e2e, e2e_deadline)
        print(
            f"(c) end to end, 2 orchestrator workers: {c['n']}/{n_e2e} completed in {c['seconds']:.2f} s = "
            f"{c['perSec']:.1f}/s (submit->completed p50 {c['latencyP50Ms']:.0f} ms)",
            flush=True,
        )
        rq_perf = horse_times(conn, "generate")
        await asyncio.to_thread(stop_procs, st.workers)
        st.workers.clear()

        # (d) bare RQ workers, same class and count, no-op jobs
        bare = start_bare_workers(redis_url, 2, root)
        await asyncio.to_thread(wait_workers, redis_url, 2, NOOP_QUEUE)
        d = await asyncio.to_thread(bare_e2e, redis_url, n_e2e, e2e_deadline)
        print(
            f"(d) bare rq.Worker x2 draining no-op jobs: {d['n']}/{n_e2e} in {d['seconds']:.2f} s = "
            f"{d['perSec']:.1f}/s (horse perform p50 {d['performP50Ms']:.1f} ms; ours {rq_perf:.1f} ms)",
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
            "horsePerformP50Ms": round(rq_perf, 1),
            "baselineHorsePerformP50Ms": round(d["performP50Ms"], 1),
            "submits": a["n"],
            "jobs": c["n"],
            "quick": quick,
            **machine_notes(),
        }

        if args.keep:
            (root / "keep").touch()
        if args.profile:
            await profile(st, root, u_submit.api_key, redis_url, api_pid, quick)
    finally:
        stop_procs(bare)
        st.stop()
        if args.keep:
            print(f"(kept {root})", file=sys.stderr)
        else:
            tmp.cleanup()
    return out


def horse_times(conn: Redis, queue: str) -> float:
    """Median time RQ saw each orchestrator job perform (work horse: import, start, run, complete)."""
    reg = FinishedJobRegistry(queue, connection=conn)
    ids = reg.get_job_ids()
    jobs = [j for j in RQJob.fetch_many(ids, connection=conn) if j is not None and j.started_at and j.ended_at]
    return percentile([(j.ended_at - j.started_at).total_seconds() * 1000 for j in jobs], 50)


async def profile(st: Any, root: Path, key: str, redis_url: str, api_pid: int, quick: bool) -> None:
    """Where the time goes: the API under submit load (py-spy --gil, CPU per thread), and the
    phases of one work horse (forked per job, as RQ does) against one warm runtime."""
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
            f" other threads (aiosqlite, to_thread) {per['otherUser']:.2f} + {per['otherSys']:.2f} ms"
        )
        if path:
            print(attribute_ours(path, top=16))
    # one work horse, phase by phase
    conn = Redis.from_url(redis_url)
    u = await st.user(credits=10**6, name="bench-horse")
    await submit_many(st.url, u.api_key, 60)
    Queue("generate", connection=conn).empty()  # nobody runs them but the probe below
    ids_file = root / "horse-ids.txt"
    ids = await asyncio.to_thread(queued_ids, root / "orchestrator.db", u.user_id)
    ids_file.write_text("\n".join(ids))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--horse-phases", str(ids_file), env=st.env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    print("\nprofile: one work horse, phases in ms (median), queues.runner's steps called one by one:")
    print(out.decode().rstrip())
    kept = env_dir or (root / "keep").exists()
    print(f"(raw py-spy profiles in {prof_dir})" if kept else "(raw py-spy profiles: set BENCH_PROFILE_DIR or --keep)")


def queued_ids(db_path: Path, user_id: str) -> list[str]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute("SELECT id FROM jobs WHERE user_id = ? AND status = 'queued'", (user_id,)).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def horse_phases(ids_file: Path) -> None:
    """Run in a fresh process with the stack's environment: warm up like `orchestrator worker`
    does before forking, then (1) fork per job as RQ does and (2) run jobs on one warm runtime,
    timing each step the runner takes (runtime set-up, load, start, complete, close)."""
    import statistics

    from orchestrator.settings import Settings
    from queues import worker as worker_mod
    from queues.runner import _load
    from queues.runtime import Runtime

    settings = Settings()
    preload = getattr(worker_mod, "_preload", None)
    if preload is not None:
        preload(settings)
    ids = [i for i in ids_file.read_text().split() if i]
    half = len(ids) // 2
    names = ["runtime", "load", "start", "complete", "close", "cpu"]

    def one(job_id: str, rt: Any = None) -> list[float]:
        marks = [time.perf_counter()]
        cpu0 = time.process_time()
        own = rt is None
        if own:
            rt = Runtime(settings)
        marks.append(time.perf_counter())
        rt.run_sync(_load(rt, job_id))
        marks.append(time.perf_counter())
        job = rt.run_sync(rt.lifecycle.start(job_id, "worker:bench", "bench"))
        marks.append(time.perf_counter())
        rt.run_sync(
            rt.lifecycle.complete(job_id, {"artifacts": [], "seconds": 0}, "worker:bench", attempt=job.attempts)
        )
        marks.append(time.perf_counter())
        if own:
            rt.close()
        marks.append(time.perf_counter())
        return [1000 * (b - a) for a, b in itertools.pairwise(marks)] + [1000 * (time.process_time() - cpu0)]

    def in_child(fn: Any) -> list[list[float]]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, json.dumps(fn()).encode())
            finally:
                os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        return list(json.loads(data))

    forked = [in_child(lambda j=j: [one(j)])[0] for j in ids[:half]]

    def warm() -> list[list[float]]:
        rt = Runtime(settings)
        try:
            return [one(j, rt) for j in ids[half:]][3:]
        finally:
            rt.close()

    reused = in_child(warm)
    for label, rows in (("forked horse per job (today)", forked), ("one warm runtime, reused", reused)):
        med = {k: round(statistics.median(r[i] for r in rows), 1) for i, k in enumerate(names)}
        total = round(sum(med[k] for k in names[:5]), 1)
        print(f"  {label:30s} total {total:5.1f}  " + "  ".join(f"{k} {v}" for k, v in med.items()))
    print("  (cpu = process CPU ms per job; the RQ fork and its Redis bookkeeping come on top)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="under a minute")
    ap.add_argument("--profile", action="store_true", help="py-spy the API and a worker after the figures")
    ap.add_argument("--submits", type=int, default=0, help="jobs submitted in (a) and enqueued in (b)")
    ap.add_argument("--jobs", type=int, default=0, help="jobs run end to end in (c) and (d)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, profiles)")
    ap.add_argument("--horse-phases", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.horse_phases:
        horse_phases(args.horse_phases)
        return
    result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
