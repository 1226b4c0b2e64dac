"""Durable webhook outbox: a delivery row is written in the same transaction as its event, so a
crash after the commit can never lose a webhook. The sender (orchestrator.delivery.sender) drains it."""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from orchestrator.core.views import FINAL, job_resource
from orchestrator.store.tables import Job


def delivery_row(job: Job, event: dict[str, Any]) -> dict[str, Any]:
    """The `webhook_deliveries` row announcing `event` of `job` (the job as it is after it)."""
    body = dict(event)
    if event["type"] == "status" and event["status"] in FINAL:
        body["job"] = job_resource(job)
    now = time.time()
    return {
        "webhook_id": "msg_" + secrets.token_urlsafe(18),
        "job_id": job.id,
        "seq": event["seq"],
        "url": job.webhook_url or "",
        "body": orjson.dumps(body).decode(),
        "state": "pending",
        "attempt": 0,
        "next_attempt_at": now,
        "attempts_log": [],
        "created_at": now,
        "updated_at": now,
    }
