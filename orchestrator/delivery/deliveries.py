"""A job's webhook deliveries as its owner sees them: the attempt log, and redelivery (one extra
attempt at once, claimed like the sender's)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlmodel import col

from orchestrator.core import secretbox
from orchestrator.core.services import Core
from orchestrator.core.views import iso
from orchestrator.delivery.sender import LEASE_MARGIN_S, _log_entry, _secret_query, attempt, claim_row, client_session
from orchestrator.errors import Conflict, NotFound
from orchestrator.store.db import Database
from orchestrator.store.tables import WebhookDelivery


def _item(row: WebhookDelivery, entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "webhookId": row.webhook_id,
        "seq": row.seq,
        "attempt": entry["attempt"],
        "statusCode": entry.get("statusCode"),
        "error": entry.get("error"),
        "latencyMs": entry.get("latencyMs"),
        "at": entry.get("at"),
        "nextAttemptAt": entry.get("nextAttemptAt"),
        "state": entry.get("state", row.state),
    }


async def deliveries_log(db: Database, job_id: str) -> list[dict[str, Any]]:
    """Every attempt of every delivery of the job, oldest first; a delivery with no recorded
    attempt yet appears once as attempt 0 in its current state."""
    async with db.read() as s:
        rows = (
            await s.execute(
                select(WebhookDelivery).where(col(WebhookDelivery.job_id) == job_id).order_by(col(WebhookDelivery.seq))
            )
        ).scalars()
        items: list[tuple[str, int, int, dict[str, Any]]] = []
        for row in rows:
            for entry in row.attempts_log:
                items.append((entry.get("at") or "", row.seq, int(entry["attempt"]), _item(row, entry)))
            if not row.attempts_log:
                nxt = row.next_attempt_at if row.state == "pending" else None
                entry = {"attempt": 0, "at": None, "nextAttemptAt": iso(nxt), "state": row.state}
                items.append((iso(row.created_at) or "", row.seq, 0, _item(row, entry)))
    items.sort(key=lambda i: (i[0], i[1], i[2]))
    return [i[3] for i in items]


async def redeliver(core: Core, job_id: str, webhook_id: str) -> dict[str, Any]:
    """One extra attempt of a delivery, made now, in this request; returns its log item.

    On a `pending` delivery it is simply the next attempt, made early (the schedule carries on
    from it if it fails). On a `delivered` or `failed` one, success makes it `delivered` and
    failure leaves it as it was (no new retries). A delivery whose attempt is in flight is 409.
    """
    async with core.db.read() as s:
        found = (
            await s.execute(
                _secret_query().where(
                    col(WebhookDelivery.webhook_id) == webhook_id, col(WebhookDelivery.job_id) == job_id
                )
            )
        ).first()
    if found is None:
        raise NotFound("delivery not found")
    row, user_id, sealed = found
    secret = secretbox.unseal(core.settings.signing_key, user_id, sealed)
    lease_s = core.settings.webhook_timeout_s + LEASE_MARGIN_S
    in_flight = row.attempt > len(row.attempts_log) and (row.next_attempt_at or 0) > time.time()
    claim = None if in_flight else await claim_row(core.db, row, secret, lease_s, manual=True)
    if claim is None:
        raise Conflict("an attempt of this delivery is in progress", code="DELIVERY_IN_PROGRESS")
    async with client_session(core.settings.webhook_allow_private) as session:
        result, decision = await attempt(core, session, claim, manual=True)
    return _item(row, _log_entry(claim.attempt, result, decision, manual=True))
