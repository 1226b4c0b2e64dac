"""What a running task sees (`orchestrator.core.ports.TaskContext`: `report`, `log`, `artifact`),
as a worker provides it. Handlers are plain synchronous code."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from rq.timeouts import JobTimeoutException

from orchestrator.core.artifacts import ArtifactStore
from orchestrator.core.ports import TaskContext

__all__ = ["Reporter", "RunSync", "TaskContext", "WorkerContext"]
"""TaskContext (the protocol, in orchestrator.core.ports) stays importable from here for task modules."""

RunSync = Callable[[Coroutine[Any, Any, Any]], Any]


class Reporter(Protocol):
    """The lifecycle's calls a task makes (queues.runner guards them for a finished job)."""

    async def progress(
        self,
        job_id: str,
        progress: float,
        message: str | None,
        data: dict[str, Any] | None,
        actor: str,
        attempt: int | None = None,
    ) -> Any: ...

    async def log(
        self, job_id: str, message: str, data: dict[str, Any] | None, actor: str, attempt: int | None = None
    ) -> Any: ...

    async def handoff(self, job_id: str, provider: str, request_id: str, actor: str) -> Any: ...


class WorkerContext:
    """The `TaskContext` a worker hands to a handler. Every call is stored and announced before it returns.

    `report` raises `JobCancelled` once the job has been cancelled (or finished elsewhere), and
    `JobTimeoutException` once the type's timeout has passed, so a handler that reports often
    stops promptly even without the worker's watchdog. `state` is what the type's `setup()`
    returned in this worker process (None without one).
    """

    def __init__(
        self,
        job_id: str,
        attempt: int,
        actor: str,
        lifecycle: Reporter,
        artifacts: ArtifactStore,
        run_sync: RunSync,
        state: Any = None,
        deadline: float | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.actor = actor
        self._lifecycle = lifecycle
        self._artifacts = artifacts
        self._run = run_sync
        self.state = state
        self._deadline = deadline
        """time.monotonic() after which the attempt has timed out"""

    def report(self, progress: float, message: str | None = None, data: dict[str, Any] | None = None) -> None:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise JobTimeoutException("the task's timeout has passed")
        self._run(
            self._lifecycle.progress(self.job_id, progress, message, data, actor=self.actor, attempt=self.attempt)
        )

    def log(self, message: str, data: dict[str, Any] | None = None) -> None:
        self._run(self._lifecycle.log(self.job_id, message, data, actor=self.actor, attempt=self.attempt))

    def handoff(self, provider: str, request_id: str) -> None:
        """The job now runs at `provider`; its webhook or poller will start and finish it."""
        self._run(self._lifecycle.handoff(self.job_id, provider, request_id, actor=self.actor))

    def artifact(self, filename: str, content: bytes, content_type: str) -> dict[str, Any]:
        return self._artifacts.save(self.job_id, filename, content, content_type)
