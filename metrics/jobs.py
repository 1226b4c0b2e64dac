"""Job metrics kept in Redis, so every process's transitions add up in one place.

A worker process can be killed or recycled (--max-jobs), so a counter kept in its memory would vanish with it.
The lifecycle therefore records each transition into Redis hashes (in the same pipeline that
publishes the event), and every API process exports them at scrape time. The values are
cluster-wide: with several API processes scraped, use `max without (instance)` (the bundled
dashboard does), never `sum`.
"""

from __future__ import annotations

from typing import Any

DURATION_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
WAIT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
SEP = "|"

# Redis hashes (the metrics package owns its keys: it imports nothing of the project)
TOTAL_KEY = "orch:metrics:jobs_total"
DURATION_KEY = "orch:metrics:job_duration"
WAIT_KEY = "orch:metrics:job_wait"


def _observe(pipe: Any, key: str, labels: tuple[str, ...], value: float, buckets: tuple[float, ...]) -> None:
    base = SEP.join(labels)
    for le in buckets:
        if value <= le:
            pipe.hincrby(key, f"{base}{SEP}{le}", 1)
    pipe.hincrby(key, f"{base}{SEP}+Inf", 1)
    pipe.hincrbyfloat(key, f"{base}{SEP}sum", value)


def record_transition(
    pipe: Any,
    queue: str,
    task_type: str,
    status: str,
    wait_s: float | None = None,
    duration_s: float | None = None,
) -> None:
    """Queue Redis commands on `pipe` for a job entering `status`."""
    pipe.hincrby(TOTAL_KEY, SEP.join((queue, task_type, status)), 1)
    if wait_s is not None:
        _observe(pipe, WAIT_KEY, (queue,), max(wait_s, 0.0), WAIT_BUCKETS_S)
    if duration_s is not None:
        _observe(
            pipe,
            DURATION_KEY,
            (queue, task_type, status),
            max(duration_s, 0.0),
            DURATION_BUCKETS_S,
        )
