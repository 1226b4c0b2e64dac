"""The public JSON shapes of jobs and events, built from rows in one place."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from orchestrator.store.tables import Job, JobEvent


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def job_resource(job: Job) -> dict[str, Any]:
    base = f"/api/jobs/{job.id}"
    out: dict[str, Any] = {
        "jobId": job.id,
        "type": job.type,
        "queue": job.queue,
        "status": job.status,
        "progress": job.progress,
        "message": job.message,
        "input": job.input,
        "result": job.result,
        "error": job.error,
        "attempts": job.attempts,
        "seq": job.seq,
        "etaSeconds": job.eta_seconds,
        "credits": {"charged": job.cost, "refunded": job.refunded},
        "createdAt": iso(job.created_at),
        "startedAt": iso(job.started_at),
        "finishedAt": iso(job.finished_at),
        "updatedAt": iso(job.updated_at),
        "webhookUrl": job.webhook_url,
        "links": {
            "self": base,
            "events": f"{base}/events",
            "stream": f"{base}/stream",
            "ws": f"/ws?jobId={job.id}",
        },
    }
    return out


EVENT_FIELDS = ("job_id", "seq", "type", "status", "progress", "message", "data", "error", "actor", "eta_seconds", "ts")


def event_dict(ev: JobEvent) -> dict[str, Any]:
    return event_from_row({k: getattr(ev, k) for k in EVENT_FIELDS})


def event_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The public event from a `job_events` row (a mapping of its columns)."""
    out: dict[str, Any] = {
        "jobId": row["job_id"],
        "seq": row["seq"],
        "type": row["type"],
        "status": row["status"],
        "progress": row["progress"],
        "message": row["message"],
        "data": row["data"],
        "error": row["error"],
        "actor": row["actor"],
        "ts": iso(row["ts"]),
    }
    if row["eta_seconds"] is not None:
        out["etaSeconds"] = row["eta_seconds"]
    return out
