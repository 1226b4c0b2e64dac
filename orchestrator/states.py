"""A job's status, in one place: the values, which are final, which refund the charge, and which
moves the lifecycle allows. The server, both clients, the dashboard and the tests read them here.

    queued ──▶ running ──▶ completed | failed | cancelled | timed_out
      │           │
      │           └──▶ queued   (retry: a retryable error or a lost worker, attempts left)
      └──▶ cancelled | failed   (cancel before start; sweeper finding nothing to run it)
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


FINAL: frozenset[str] = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT})
"""A job in one of these never changes again."""

REFUNDED: frozenset[str] = frozenset({JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT})
"""Entering one of these gives the charge back (once per job)."""

ALLOWED: dict[str, frozenset[str]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT, JobStatus.QUEUED}
    ),
}
"""The status a job may move to from each status that is not final."""


def allowed(old: str, new: str) -> bool:
    return new in ALLOWED.get(old, frozenset())
