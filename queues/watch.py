"""In a worker process, a thread beside the task: the heartbeat, and the cooperative stop.

The task runs on the main thread, so the thread keeps `orch:hb:{name}` alive (value: the RQ id
of the attempt running, or "idle"; TTL = ORCH_WORKER_LOST_AFTER) for the sweeper. While a task
runs it also polls the attempt's stop flag (`keys.cancel_flag`, set by `Dispatcher.stop` on a
cancel or a sweeper timeout) every `POLL_S` and, when set, interrupts the main thread with a
signal whose handler raises `JobCancelled` inside the task. A task that catches that or sits
in C code is ended by the supervisor's watchdog (queues.supervisor) after its grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType, TracebackType

from redis import Redis

from orchestrator import keys
from orchestrator.errors import JobCancelled

log = logging.getLogger(__name__)

POLL_S = 0.1
INTERRUPT = signal.SIGUSR1
ORPHANED_EXIT = 70


class JobWatch:
    def __init__(self, redis: Redis, worker_name: str, lost_after_s: float) -> None:
        self.redis = redis
        self.worker_name = worker_name
        self.lost_after_s = lost_after_s
        self.parent = os.getppid()
        self._lock = threading.Lock()
        self._rq_id = ""
        self._job_id = ""
        self._inside = False
        self._interrupted = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orchestrator-watch", daemon=True)

    def start(self) -> None:
        signal.signal(INTERRUPT, self._on_interrupt)
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def running(self, rq_id: str, job_id: str) -> None:
        """The main thread starts (or, with empty ids, ends) an attempt."""
        with self._lock:
            self._rq_id, self._job_id, self._interrupted = rq_id, job_id, False
        self._beat()

    # the context the runner enters around a task's setup and handler
    def __enter__(self) -> None:
        self._inside = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._inside = False

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self._inside and self._interrupted:
            raise JobCancelled("the job was cancelled or timed out elsewhere")

    def _beat(self) -> None:
        with self._lock:
            try:
                self.redis.set(
                    keys.worker_heartbeat(self.worker_name),
                    self._rq_id or "idle",
                    ex=max(1, int(self.lost_after_s)),
                )
            except Exception as exc:  # Redis away: the sweeper will judge
                log.warning("heartbeat failed: %s", exc)

    def _run(self) -> None:
        beat_every = max(POLL_S, self.lost_after_s / 4)
        next_beat = time.monotonic() + beat_every
        while not self._stop.wait(POLL_S):
            if os.getppid() != self.parent:
                log.error("the supervisor is gone; exiting")
                os._exit(ORPHANED_EXIT)
            if time.monotonic() >= next_beat:
                self._beat()
                next_beat = time.monotonic() + beat_every
            try:
                self._check_stop()
            except Exception as exc:  # Redis away: the supervisor's watchdog still holds
                log.warning("cannot read the stop flag: %s", exc)

    def _check_stop(self) -> None:
        job_id = self._job_id
        if job_id and self._inside and not self._interrupted and self.redis.exists(keys.cancel_flag(job_id)):
            if self._job_id == job_id:
                self._interrupted = True
                signal.pthread_kill(threading.main_thread().ident or 0, INTERRUPT)
