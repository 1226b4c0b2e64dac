"""Every Redis key and channel the project uses, in one place."""

PREFIX = "orch"
EVENTS_CHANNEL = f"{PREFIX}:events"
"""Pub/sub channel carrying every stored event (JSON); each API process holds one subscription."""

JOB_METRICS_TOTAL = f"{PREFIX}:metrics:jobs_total"
JOB_METRICS_DURATION = f"{PREFIX}:metrics:job_duration"
JOB_METRICS_WAIT = f"{PREFIX}:metrics:job_wait"
SWEEPER_LOCK = f"{PREFIX}:lock:sweeper"
DELAYED = f"{PREFIX}:delayed"
"""Attempts waiting for their backoff: member `jobId|queue|attempt|timeout`, score = due time."""


def event_log(job_id: str) -> str:
    """Sorted set of a job's events scored by seq: replay without a database query per event."""
    return f"{PREFIX}:log:{job_id}"


def cancel_flag(job_id: str) -> str:
    return f"{PREFIX}:cancel:{job_id}"


def worker_heartbeat(worker_name: str) -> str:
    """Set by a live worker every few seconds, expiring after ORCH_WORKER_LOST_AFTER."""
    return f"{PREFIX}:hb:{worker_name}"


def rate_window(name: str, user_id: str, window: int) -> str:
    """A user's count of `name` requests in fixed window number `window` (see ratelimit)."""
    return f"{PREFIX}:rl:{name}:{user_id}:{window}"
