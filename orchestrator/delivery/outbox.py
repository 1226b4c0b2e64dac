"""Durable webhook outbox: a delivery row is written in the same transaction as its event, so a
crash after the commit can never lose a webhook. The sender (orchestrator.delivery.sender) drains it.
`WebhookOutbox` is the webhook's `DurableChannel` (orchestrator.core.ports)."""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson
from sqlalchemy import Connection, delete, insert

from orchestrator.core.views import job_resource
from orchestrator.states import FINAL
from orchestrator.store.tables import Job, WebhookDelivery

DEFAULT_WEBHOOK_EVENTS = ("completed", "failed", "cancelled", "timed_out")
"""What a job's webhook receives when the submit names no `webhookEvents`."""
DELIVERIES = WebhookDelivery.__table__  # type: ignore[attr-defined]
INSERT_DELIVERY = insert(DELIVERIES)


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


class WebhookOutbox:
    """Status events by their status, progress events when "progress" is asked for; never logs."""

    def record(self, conn: Connection, job: Job, event: dict[str, Any]) -> None:
        if not job.webhook_url:
            return
        wanted = job.webhook_events or DEFAULT_WEBHOOK_EVENTS
        if (event["type"] == "progress" and "progress" in wanted) or (
            event["type"] == "status" and event["status"] in wanted
        ):
            conn.execute(INSERT_DELIVERY, delivery_row(job, event))

    def forget(self, conn: Connection, job_id: str) -> None:
        conn.execute(delete(DELIVERIES).where(DELIVERIES.c.job_id == job_id))
