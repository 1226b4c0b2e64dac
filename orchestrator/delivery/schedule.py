"""Webhook signing and retry arithmetic: pure functions, no I/O. What to do after an attempt
(`decide`) and when to try again (`retry_delay_s`: the schedule's entry +-20 % jitter, or the
receiver's Retry-After if larger, capped at twice the schedule's last entry)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

JITTER = 0.2


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks `webhook-signature` value for one attempt."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError):
        return None


def retry_delay_s(schedule: list[float], attempt: int, retry_after: float | None) -> float | None:
    """Wait after failed attempt number `attempt` (1-based); None when the schedule is spent."""
    if attempt > len(schedule):
        return None
    delay = schedule[attempt - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, schedule[-1] * 2))
    return delay


@dataclass
class Claim:
    """One attempt this process owns: `attempt` is its number (the row's counter after claiming)."""

    webhook_id: str
    job_id: str
    seq: int
    url: str
    body: str
    secret: str
    attempt: int
    prior_state: str  # the row's state before the claim (pending for the sender)


@dataclass
class Result:
    kind: str  # ok, http_error, gone, error, forbidden
    status_code: int | None
    error: str | None
    latency_ms: float | None
    started_at: float
    retry_after: float | None = None


@dataclass
class Decision:
    state: str
    next_attempt_at: float | None
    outcome: str  # the metric label: success, retry, failed, gone, forbidden


def decide(claim: Claim, result: Result, schedule: list[float], now: float) -> Decision:
    """What an attempt's result does to its delivery."""
    if result.kind == "ok":
        return Decision("delivered", None, "success")
    if claim.prior_state != "pending":
        # an extra attempt on a finished delivery leaves its state as it was
        outcome = {"gone": "gone", "forbidden": "forbidden"}.get(result.kind, "failed")
        return Decision(claim.prior_state, None, outcome)
    if result.kind == "gone":
        return Decision("failed", None, "gone")
    if result.kind == "forbidden":
        return Decision("failed", None, "forbidden")
    delay = retry_delay_s(schedule, claim.attempt, result.retry_after)
    if delay is None:
        return Decision("failed", None, "failed")
    return Decision("pending", now + delay, "retry")
