"""Every Redis key and channel the project uses, in one place (the job metrics' hashes are
metrics.jobs', since the metrics package imports nothing of ours)."""

PREFIX = "orch"
EVENTS_CHANNEL = f"{PREFIX}:events"
"""Pub/sub channel carrying every stored event (JSON); each API process holds one subscription."""

SWEEPER_LOCK = f"{PREFIX}:lock:sweeper"
DELAYED = f"{PREFIX}:delayed"
"""Attempts waiting for their backoff: member `jobId|queue|attempt|timeout`, score = due time."""


def event_log(job_id: str) -> str:
    """Sorted set of a job's events scored by seq: replay without a database query per event."""
    return f"{PREFIX}:log:{job_id}"


def cancel_flag(job_id: str) -> str:
    """Set by `Dispatcher.stop` (a cancel, a sweeper timeout): the worker running the job stops it."""
    return f"{PREFIX}:cancel:{job_id}"


def worker_heartbeat(worker_name: str) -> str:
    """Set by a live worker every few seconds, expiring after ORCH_WORKER_LOST_AFTER."""
    return f"{PREFIX}:hb:{worker_name}"


SLOT_PROCESSES = f"{PREFIX}:slots:processes"
"""Sorted set of API processes holding sockets or streams, scored by their last heartbeat."""


def slots(process: str) -> str:
    """Hash of one API process's open sockets and streams per user, expiring without a heartbeat."""
    return f"{PREFIX}:slots:{process}"


def rate_window(name: str, user_id: str, window: int) -> str:
    """A user's count of `name` requests in fixed window number `window` (see ratelimit)."""
    return f"{PREFIX}:rl:{name}:{user_id}:{window}"
