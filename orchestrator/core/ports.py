"""What the core needs from the parts around it, as protocols: the core calls these and never
imports the modules that implement them (queues/ and delivery/ depend on the core, not the
reverse). The composition roots (orchestrator.app for API processes, queues.runtime for workers)
hand the implementations in.

- `Dispatcher`: puts attempts of jobs in front of workers and stops them (queues.dispatch, on RQ).
- `DurableChannel`: a channel that must never lose an event writes its outbox row in the event's
  own transaction (delivery.outbox for webhooks). A new durable channel is one module that
  implements `record`, listed in delivery.channels.
- `TaskContext`: what a handler sees while it runs (queues.context).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from sqlalchemy import Connection

    from orchestrator.store.tables import Job


class Dispatcher(Protocol):
    def add_enqueue(self, pipe: Any, job_id: str, queue: str, attempt: int, timeout_s: int, delay_s: float = 0) -> None:
        """Queue on `pipe` the commands that enqueue an attempt (sent with its event)."""

    async def prepare(self, aredis: aioredis.Redis, queues: list[str]) -> None:
        """Load what `add_enqueue` needs on the server (scripts), once per process."""

    async def aenqueue(self, job_id: str, queue: str, attempt: int, timeout_s: int, delay_s: float = 0) -> None:
        """Enqueue an attempt again (the sweeper, when Redis lost it)."""

    async def astop(self, job_id: str, attempt: int) -> None:
        """Take an attempt off its queue, or ask the worker running it to stop."""

    def promote_due(self, limit: int = 100) -> list[str]:
        """Move attempts whose retry backoff is over onto their queue; their job ids."""

    def is_enqueued(self, job_id: str, attempt: int) -> bool:
        """Whether Redis still holds the attempt (queued, delayed or started)."""

    def attempt_state(self, job_id: str, attempt: int) -> tuple[str | None, str | None]:
        """The attempt's state on the queue and the worker that holds it, if any."""

    def worker_running(self, worker_name: str | None, rq_id: str) -> bool:
        """Whether that worker is alive and still on that attempt."""


class DurableChannel(Protocol):
    def record(self, conn: Connection, job: Job, event: dict[str, Any]) -> None:
        """Write the channel's outbox row for `event` of `job` (the job as it is after it), if the
        job asked for this event on this channel. Runs inside the event's transaction."""

    def forget(self, conn: Connection, job_id: str) -> None:
        """Delete the job's rows: its submit is being taken back (Redis refused the enqueue)."""


class TaskContext(Protocol):
    """Handed to a handler. Every call is stored and announced before it returns."""

    job_id: str
    attempt: int
    state: Any
    """What the type's `setup()` returned in this worker process (None without one)."""

    def report(self, progress: float, message: str | None = None, data: dict[str, Any] | None = None) -> None: ...

    def log(self, message: str, data: dict[str, Any] | None = None) -> None: ...

    def handoff(self, provider: str, request_id: str) -> None: ...

    def artifact(self, filename: str, content: bytes, content_type: str) -> dict[str, Any]: ...
