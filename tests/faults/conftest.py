"""Fault tests run with fast failure detection: a sweep every 0.5 s, workers lost after 3 s."""

from __future__ import annotations

FAST = {
    "ORCH_SWEEP_INTERVAL": "0.5",
    "ORCH_WORKER_LOST_AFTER": "3",
    "ORCH_REQUEUE_AFTER": "2",
    "ORCH_TASK_MODULES": "flaky_tasks",
    "PYTHONPATH": __file__.rsplit("/faults/", 1)[0],
}
