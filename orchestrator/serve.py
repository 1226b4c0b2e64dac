"""`orchestrator serve --processes N`: N API processes on one port.

Each child is a full `orchestrator serve --reuse-port` (its own event loop, hub, sockets, SSE
streams, long-polls); the kernel spreads new connections over them (SO_REUSEPORT). Whatever a
socket needs from another process comes through Redis, as with API processes on several
machines. Per-process Prometheus metrics are kept in a PROMETHEUS_MULTIPROC_DIR shared by the
children, so `/metrics` on any of them answers for all. The parent only supervises: a child that
exits is started again after a short pause; SIGTERM or SIGINT stops every child (SIGTERM, then
SIGKILL after a grace period) before the parent exits, and each child gets SIGTERM from the
kernel if the parent dies first (PR_SET_PDEATHSIG), so none outlives it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from orchestrator.processes import parent_death_signal

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
STOP_GRACE_S = 10.0


def _spawn(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--reuse-port"],
        preexec_fn=parent_death_signal(),
        env=env,
    )


def supervise(processes: int) -> int:
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    metrics_dir = tempfile.mkdtemp(prefix="orchestrator-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    children = [_spawn(env) for _ in range(processes)]
    log.info("serving with %d API processes: %s", processes, [c.pid for c in children])
    try:
        while not stopping:
            for i, child in enumerate(children):
                if child.poll() is not None and not stopping:
                    log.warning("API process %d exited with %s; starting another", child.pid, child.returncode)
                    mark_process_dead(child.pid, metrics_dir)
                    time.sleep(RESTART_DELAY_S)
                    if not stopping:
                        children[i] = _spawn(env)
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
        for s, handler in old.items():
            signal.signal(s, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
