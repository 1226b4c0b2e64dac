"""Shared helpers of the benchmarks: the stack (from tests/support.py), percentiles, limits,
process RSS and a py-spy profile summary. Nothing here is part of the product."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from support import Postgres, Stack  # noqa: E402  (tests/ is on the path now)

BENCH_ENV = {
    "ORCH_SUBMIT_RATE": "1000000/minute",
    "ORCH_LOG_LEVEL": "WARNING",
    "ORCH_MAX_SOCKETS_PER_USER": "100000",
}


class BenchDatabase:
    """The database a benchmark runs on: SQLite in `root`, or a throwaway Postgres 15 cluster
    started from the machine's binaries (as tests/support.py does)."""

    def __init__(self, root: Path, kind: str = "sqlite") -> None:
        self.kind = kind
        self.pg: Postgres | None = None
        if kind == "postgres":
            self.pg = Postgres(root / "pg").start()
            self.url = self.pg.create_db("bench")
        elif kind == "sqlite":
            self.url = f"sqlite+aiosqlite:///{root / 'orchestrator.db'}"
        else:
            raise SystemExit(f"--db must be sqlite or postgres, not {kind!r}")

    async def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Rows of a read-only query (a fresh engine each time: benchmarks poll rarely)."""
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(self.url)
        try:
            async with engine.connect() as conn:
                return [tuple(r) for r in (await conn.execute(text(sql), params or {})).all()]
        finally:
            await engine.dispose()

    def stop(self) -> None:
        if self.pg is not None:
            self.pg.stop()


def stack(root: Path, extra_env: dict[str, str] | None = None, database_url: str | None = None) -> Stack:
    """A stack in `root` (not started), on SQLite there unless `database_url` is given."""
    env = dict(BENCH_ENV)
    env.update(extra_env or {})
    if os.environ.get("BENCH_PYTHONPATH"):
        # experiments: a sitecustomize.py in that dir is loaded by the API and worker processes
        env["PYTHONPATH"] = str(Path(os.environ["BENCH_PYTHONPATH"]).resolve())
    return Stack(root, database_url or f"sqlite+aiosqlite:///{root / 'orchestrator.db'}", env)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE (children inherit it). Root may raise the hard limit too."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target_hard in (max(hard, want), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, target_hard), target_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its descendants, living or reaped (cutime/cstime count
    the children it has waited for: forked work horses, restarted worker children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        total += sum(tree_cpu_seconds(int(c)) for c in children)
    return total


def machine_notes() -> dict[str, Any]:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg1m": round(load[0], 2)}


class PySpy:
    """`py-spy record` of one process (and optionally its forked children) until stopped."""

    def __init__(self, pid: int, out: Path, subprocesses: bool = False, rate: int = 200, gil: bool = False) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            print(f"(py-spy not found: no profile of pid {pid}; `.venv/bin/pip install py-spy`)", file=sys.stderr)
            return
        cmd = [exe, "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", str(out), "--nonblocking"]
        if subprocesses:
            cmd.append("--subprocesses")
        if gil:
            cmd.append("--gil")  # only the thread holding the GIL: Python CPU, not threads parked in C
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> Path | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None
        return self.out if self.out.exists() else None


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    path = loc.rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def summarize_profile(path: Path, top: int = 18, focus: Sequence[str] = ()) -> str:
    """Inclusive and self sample shares from py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack_s, _, count_s = line.rpartition(" ")
        if not stack_s:
            continue
        n = int(count_s)
        frames = [_frame_name(f) for f in stack_s.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread (")]
        total += n
        for f in set(frames):
            inclusive[f] += n
        if frames:
            own[frames[-1]] += n
    if not total:
        return "(empty profile)"
    lines = [f"  {total} samples (non-idle); inclusive share, top {top}:"]
    for f, n in inclusive.most_common(top):
        lines.append(f"    {100 * n / total:5.1f}%  {f}")
    lines.append("  self share, top 12:")
    for f, n in own.most_common(12):
        lines.append(f"    {100 * n / total:5.1f}%  {f}")
    if focus:
        lines.append("  focus (inclusive):")
        for key in focus:
            n = _stacks_containing(path, key)
            lines.append(f"    {100 * n / total:5.1f}%  {key}")
    return "\n".join(lines)


def _stacks_containing(path: Path, key: str) -> int:
    n = 0
    for line in path.read_text().splitlines():
        stack_s, _, count_s = line.rpartition(" ")
        if stack_s and key in stack_s:
            n += int(count_s)
    return n


OURS = ("orchestrator/", "queues/", "ws_gateway/", "metrics/")
IDLE_LEAVES = ("EpollSelector.select", "_connection_worker_thread (aiosqlite/core.py:59)", "Condition.wait")


def attribute_ours(path: Path, top: int = 20) -> str:
    """Samples by the innermost frame of our own code (library time is charged to its caller).
    SQLAlchemy's async layer runs statements in greenlets whose stacks have no caller frame:
    py-spy shows them as separate roots, counted here as one line."""
    by: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack_s, _, count_s = line.rpartition(" ")
        if not stack_s:
            continue
        n = int(count_s)
        frames = [f for f in stack_s.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += n
        if any(frames[-1].startswith(i) for i in IDLE_LEAVES):
            by["(waiting: epoll / queue / condition)"] += n
            continue
        ours = [f for f in frames if any(o in f for o in OURS) and "orchestrator/cli.py" not in f]
        if ours:
            by[_frame_name(ours[-1])] += n
        elif frames[0].startswith(("Session.", "AsyncSession", "Connection.")) or "sqlalchemy" in frames[0]:
            by["SQLAlchemy in a greenlet (caller not visible)"] += n
        elif "Thread._bootstrap" in frames[0]:
            by["other threads: " + _frame_name(frames[min(3, len(frames) - 1)])] += n
        else:
            by["event loop, aiohttp, redis-py (no frame of ours): " + _frame_name(frames[-1])] += n
    if not total:
        return "(empty profile)"
    out = [f"  {total} samples; by innermost frame of our code, top {top}:"]
    for k, n in by.most_common(top):
        out.append(f"    {100 * n / total:5.1f}%  {k}")
    return "\n".join(out)


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds per thread of a process, the main thread as "main"."""
    tck = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        f = stat.rsplit(")", 1)[1].split()
        out["main" if tid == str(pid) else tid] = (int(f[11]) / tck, int(f[12]) / tck)
    return out


def thread_cpu_delta(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """CPU seconds spent between two snapshots: main thread (user, sys) and all other threads."""
    res = {"mainUser": 0.0, "mainSys": 0.0, "otherUser": 0.0, "otherSys": 0.0}
    for tid, (u, s) in after.items():
        u0, s0 = before.get(tid, (0.0, 0.0))
        pre = "main" if tid == "main" else "other"
        res[pre + "User"] += u - u0
        res[pre + "Sys"] += s - s0
    return res
