"""`orchestrator worker`: a small supervisor around one warm worker process (queues.worker).

It starts the worker, learns from a pipe which attempt it runs, and is its watchdog: when the
attempt's stop flag appears (a cancel, a sweeper timeout) and the task is still running `GRACE_S`
later, or the task runs `GRACE_S` past its type's timeout, the worker is killed (SIGKILL) and a
new one started. Cooperative stops come first: `report` raises on a cancel or a passed deadline,
the worker's own watch interrupts a cancelled task, RQ's alarm a timed-out one.

When the worker ends, the supervisor starts another: at once after a watchdog kill or a
`--max-jobs` recycle, with back-off (0.5 s doubling to 30 s) after crashes in a row. The attempt
a dead worker was running is reported by its successor first thing: `timed_out` after a timeout
kill, lost (retried or failed WORKER_LOST, refunded) after a crash; if no successor manages to,
the worker's heartbeat key expires and the sweeper does it. SIGTERM or SIGINT is passed on to the
worker (a warm shutdown: it finishes its job), and the supervisor exits when the worker has.
The worker gets SIGTERM if the supervisor dies, and exits itself when it finds itself orphaned.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from orchestrator import keys
from orchestrator.processes import parent_death_signal
from orchestrator.settings import Settings

log = logging.getLogger(__name__)

GRACE_S = 1.0
"""How long a task may ignore a cancel, or run past its timeout, before its process is killed."""
POLL_S = 0.1
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_S = 30.0
"""A worker that lived this long resets the crash back-off."""
RECYCLE_EXIT = 75  # queues.worker.RECYCLE_EXIT (not imported: the supervisor stays light)
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""One BLAS thread per worker unless set: several workers on a machine each spinning a thread per
core made a `lora` step ~10x slower on a busy 2-core machine (measured: 100 steps 6-9 s vs 0.9 s)."""


@dataclass
class Attempt:
    job_id: str
    attempt: int
    timeout_s: float
    since: float = field(default_factory=time.monotonic)
    stop_seen: float | None = None


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    name: str
    status_fd: int
    started: float = field(default_factory=time.monotonic)
    buffer: bytes = b""
    attempt: Attempt | None = None
    killed_for: str | None = None


class Supervisor:
    def __init__(self, settings: Settings, queues: list[str], burst: bool = False, max_jobs: int = 0) -> None:
        self.settings = settings
        self.queues = queues
        self.burst = burst
        self.max_jobs = max_jobs
        self.redis = Redis.from_url(settings.redis, socket_timeout=2, socket_connect_timeout=2)
        self.stopping = False
        self.child: Child | None = None
        self.reports: list[dict[str, Any]] = []
        self.crashes = 0
        self.worked = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            while True:
                if self.child is None:
                    if self.stopping:
                        return 0
                    self.child = self._spawn()
                done = self._step(self.child)
                if done is not None:
                    return done
        finally:
            if self.child is not None and self.child.proc.poll() is None:
                self.child.proc.kill()
                self.child.proc.wait(10)
            self.redis.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self.child is not None and self.child.proc.poll() is None:
            self.child.proc.send_signal(signal.SIGTERM)

    def _spawn(self) -> Child:
        name = f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        args = [sys.executable, "-m", "queues.worker", "--queues", ",".join(self.queues), "--name", name]
        args += ["--status-fd", str(write_fd), "--reports", json.dumps(self.reports)]
        if self.burst:
            args.append("--burst")
        if self.max_jobs:
            args += ["--max-jobs", str(self.max_jobs)]
        try:
            env = {k: "1" for k in BLAS_THREADS} | dict(os.environ)
            proc = subprocess.Popen(args, pass_fds=(write_fd,), env=env, preexec_fn=parent_death_signal())
        finally:
            os.close(write_fd)
        log.info("started worker %s (pid %d)", name, proc.pid)
        return Child(proc, name, read_fd)

    def _step(self, child: Child) -> int | None:
        """Read the worker's news, watch its attempt, handle its end. An exit code when done."""
        try:
            select.select([child.status_fd], [], [], POLL_S)
        except InterruptedError:
            pass
        self._read(child)
        code = child.proc.poll()
        if code is None:
            self._watch(child)
            return None
        self._read(child)
        os.close(child.status_fd)
        self.child = None
        return self._ended(child, code)

    def _read(self, child: Child) -> None:
        while True:
            try:
                chunk = os.read(child.status_fd, 4096)
            except BlockingIOError:
                return
            if not chunk:
                return
            child.buffer += chunk
            *lines, child.buffer = child.buffer.split(b"\n")
            for line in lines:
                self._hear(child, line.decode().split())

    def _hear(self, child: Child, words: list[str]) -> None:
        if words == ["ready"]:
            self.reports = []  # the new worker recorded them
        elif len(words) == 4 and words[0] == "run":
            child.attempt = Attempt(words[1], int(words[2]), float(words[3]))
            self.worked = True
        elif words == ["idle"]:
            child.attempt = None

    def _watch(self, child: Child) -> None:
        a = child.attempt
        if a is None or child.killed_for is not None:
            return
        now = time.monotonic()
        if a.stop_seen is None:
            try:
                if self.redis.exists(keys.cancel_flag(a.job_id)):
                    a.stop_seen = now
            except Exception as exc:  # Redis away: the timeout still holds
                log.warning("watchdog cannot read the stop flag: %s", exc)
        if a.stop_seen is not None and now - a.stop_seen > GRACE_S:
            self._kill(child, "stopped")
        elif a.timeout_s > 0 and now - a.since > a.timeout_s + GRACE_S:
            self._kill(child, "timeout")

    def _kill(self, child: Child, why: str) -> None:
        assert child.attempt is not None
        log.warning(
            "worker %s ignored the %s of job %s for %.1f s: killing it",
            child.name,
            "stop" if why == "stopped" else "timeout",
            child.attempt.job_id,
            GRACE_S,
        )
        child.killed_for = why
        child.proc.kill()

    def _ended(self, child: Child, code: int) -> int | None:
        a = child.attempt
        lived = time.monotonic() - child.started
        if child.killed_for is not None and a is not None:
            if child.killed_for == "timeout":
                self._report(child, "timeout", a)
            else:  # cancelled, or timed out elsewhere: the job is final already
                self._forget(child)
                self._report(child, "gone")
            return None
        if code == RECYCLE_EXIT:
            log.info("worker %s recycled after %d jobs", child.name, self.max_jobs)
            return None
        if self.stopping:
            return 0
        if self.burst and code in (0, 1):
            return 0 if self.worked else 1
        if a is not None:
            self._report(child, "lost", a, f"worker process {child.name} died ({_describe(code)})")
        else:
            self._report(child, "gone")
        self.crashes = 0 if lived > STABLE_S else self.crashes + 1
        delay = BACKOFF_S[min(self.crashes, len(BACKOFF_S)) - 1] if self.crashes else 0.0
        log.warning("worker %s ended (%s); restarting in %.1f s", child.name, _describe(code), delay)
        deadline = time.monotonic() + delay
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        return 0 if self.stopping else None

    def _report(self, child: Child, kind: str, a: Attempt | None = None, reason: str = "") -> None:
        """For the next worker to record first thing: `timeout` or `lost` (an attempt that ended
        with its process), `gone` (only the dead worker's registration to clear)."""
        report: dict[str, Any] = {"kind": kind, "worker": child.name}
        if a is not None:
            report |= {"jobId": a.job_id, "attempt": a.attempt, "timeoutS": a.timeout_s, "reason": reason}
        self.reports.append(report)

    def _forget(self, child: Child) -> None:
        try:
            self.redis.delete(keys.worker_heartbeat(child.name))
        except Exception as exc:
            log.warning("could not drop %s's heartbeat: %s", child.name, exc)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def run_worker(settings: Settings, queues: list[str], burst: bool = False, max_jobs: int = 0) -> int:
    from orchestrator.core.tasktypes import QUEUES

    for q in queues:
        if q not in QUEUES:
            raise SystemExit(f"unknown queue {q!r}; known: {', '.join(QUEUES)}")
    return Supervisor(settings, queues, burst, max_jobs).run()
