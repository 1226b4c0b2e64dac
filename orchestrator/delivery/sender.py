"""The webhook sender: drains the durable outbox (`webhook_deliveries`, see webhook_queue).

Every API process runs one `Sender`. Work is claimed through SQL, so several processes never
make the same attempt twice, and retries survive restarts because their schedule is the row:

- A row is *due* when `state = 'pending' and next_attempt_at <= now`.
- Claiming is a compare-and-set on the attempt counter:
  `UPDATE ... SET attempt = a + 1, next_attempt_at = now + lease WHERE webhook_id = :id AND
  attempt = a AND state = 'pending' AND next_attempt_at <= now`. One process wins; the lease
  hides the row from the others while the attempt runs. A process that dies mid-attempt leaves
  `attempt` ahead of `attempts_log`; whoever claims the row after the lease records that attempt
  as interrupted and sends again (delivery is at least once; receivers dedupe on `webhook-id`).
  A process stopped gracefully hands its claim back instead.
- One job's rows go out one at a time in `seq` order (a job is handled by one task per process,
  and a task stops as soon as another process wins one of the job's rows).
- The result is written under the row lock (`SELECT ... FOR UPDATE` on Postgres, the write lock
  on SQLite): the attempt is appended to `attempts_log` and the row becomes `delivered`,
  `failed` (410 Gone, forbidden address, schedule exhausted) or `pending` again with the next
  `next_attempt_at` (schedule[n-1] +-20 % jitter, or Retry-After if larger, capped at twice the
  schedule's last entry).

The sender never touches the job: a failing webhook never fails a job (DESIGN line 1).
`redeliver` makes one extra attempt at once, claimed the same way (see its docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
import orjson
from sqlalchemy import func, select, update
from sqlmodel import col

from metrics.realtime import WEBHOOK_DELIVERIES, event_time, observe_lag
from orchestrator.core import secretbox
from orchestrator.core.services import Core
from orchestrator.core.views import iso
from orchestrator.delivery.schedule import Claim, Decision, Result, decide, retry_after_s, sign
from orchestrator.delivery.ssrf import ForbiddenUrl, PublicOnlyResolver, check_url
from orchestrator.errors import ValidationFailed
from orchestrator.loops import every
from orchestrator.store.db import Database
from orchestrator.store.tables import Job, User, WebhookDelivery

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.25
"""How often each process looks for due rows."""
MAX_JOBS_IN_FLIGHT = 32
"""Jobs whose deliveries one process sends concurrently (each job's rows go one at a time)."""
ROWS_PER_TASK = 100
"""Rows one job task sends before it yields to the next poll (fairness between jobs)."""
LEASE_MARGIN_S = 30.0
"""A claim hides a row for the request timeout plus this margin."""
RECORD_TRIES = 3
USER_AGENT = "orchestrator-webhooks/1"
INTERRUPTED = "interrupted: the sending process stopped during the attempt"


# ---- pure helpers --------------------------------------------------------------------------------


def client_session(allow_private: bool) -> aiohttp.ClientSession:
    resolver = None if allow_private else PublicOnlyResolver()
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_JOBS_IN_FLIGHT * 2, resolver=resolver),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
    )


async def send(session: aiohttp.ClientSession, claim: Claim, *, allow_private: bool, timeout_s: float) -> Result:
    """Make one attempt: re-check the address, sign, POST (no redirects), classify the answer."""
    started = time.time()
    try:
        await check_url(claim.url, allow_private)
    except ValidationFailed as exc:
        return Result("forbidden", None, exc.message, None, started)
    body = claim.body.encode()
    timestamp = int(started)
    headers = {
        "webhook-id": claim.webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(claim.secret, claim.webhook_id, timestamp, body),
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    t0 = time.perf_counter()

    def latency() -> float:
        return round((time.perf_counter() - t0) * 1000, 1)

    try:
        async with session.post(
            claim.url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            status = resp.status
            after = retry_after_s(resp.headers.get("Retry-After"), time.time())
    except ForbiddenUrl as exc:
        return Result("forbidden", None, exc.message, latency(), started)
    except TimeoutError:
        return Result("error", None, f"timeout after {timeout_s:g} s", latency(), started)
    except aiohttp.ClientConnectorError as exc:
        return Result("error", None, f"connection failed: {exc.os_error or exc}", latency(), started)
    except Exception as exc:  # any other failure of the exchange is retried like a refusal
        return Result("error", None, f"{type(exc).__name__}: {exc}", latency(), started)
    ms = latency()
    if 200 <= status < 300:
        return Result("ok", status, None, ms, started)
    if status == 410:
        return Result("gone", status, "HTTP 410 Gone: retries stopped", ms, started)
    error = f"HTTP {status} (redirects are not followed)" if 300 <= status < 400 else f"HTTP {status}"
    return Result("http_error", status, error, ms, started, after)


# ---- SQL ---------------------------------------------------------------------------------------


def _log_entry(attempt: int, result: Result, decision: Decision, manual: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "attempt": attempt,
        "statusCode": result.status_code,
        "error": result.error,
        "latencyMs": result.latency_ms,
        "at": iso(result.started_at),
        "nextAttemptAt": iso(decision.next_attempt_at),
        "state": decision.state,
    }
    if manual:
        entry["manual"] = True
    return entry


def _interrupted(log_: list[dict[str, Any]], attempt: int, now: float) -> list[dict[str, Any]]:
    """The log with an entry for every claimed attempt that never recorded its result."""
    out = list(log_)
    for n in range(len(out) + 1, attempt + 1):
        out.append(
            {
                "attempt": n,
                "statusCode": None,
                "error": INTERRUPTED,
                "latencyMs": None,
                "at": iso(now),
                "nextAttemptAt": None,
                "state": "pending",
            }
        )
    return out


def _secret_query() -> Any:
    """Rows of (delivery, user id, sealed secret): open the secret with `_secret`."""
    return (
        select(WebhookDelivery, col(User.id), col(User.webhook_secret))
        .join(Job, col(Job.id) == col(WebhookDelivery.job_id))
        .join(User, col(User.id) == col(Job.user_id))
    )


async def claim_row(
    db: Database, row: WebhookDelivery, secret: str, lease_s: float, *, manual: bool = False
) -> Claim | None:
    """Compare-and-set the row's attempt counter; None when another claimer got there first."""
    now = time.time()
    cond = [
        col(WebhookDelivery.webhook_id) == row.webhook_id,
        col(WebhookDelivery.attempt) == row.attempt,
        col(WebhookDelivery.state) == row.state,
    ]
    if not manual:
        cond.append(col(WebhookDelivery.next_attempt_at) <= now)
    values: dict[str, Any] = {
        "attempt": row.attempt + 1,
        "next_attempt_at": now + lease_s,
        "updated_at": now,
    }
    if row.attempt > len(row.attempts_log):
        values["attempts_log"] = _interrupted(row.attempts_log, row.attempt, now)
    async with db.write() as s:
        res = await s.execute(update(WebhookDelivery).where(*cond).values(**values))
    if getattr(res, "rowcount", 0) != 1:
        return None
    return Claim(row.webhook_id, row.job_id, row.seq, row.url, row.body, secret, row.attempt + 1, row.state)


async def record(
    db: Database, claim: Claim, result: Result, schedule: list[float], *, manual: bool = False
) -> Decision:
    """Append the attempt to the log and move the row on, under the row's lock."""
    now = time.time()
    decision = decide(claim, result, schedule, now)
    async with db.write() as s:
        row = (
            await s.execute(
                select(WebhookDelivery).where(col(WebhookDelivery.webhook_id) == claim.webhook_id).with_for_update()
            )
        ).scalar_one_or_none()
        if row is None:  # the job was taken back (failed enqueue): nothing to record
            return decision
        log_ = _interrupted(row.attempts_log, claim.attempt - 1, now)
        log_ = [e for e in log_ if e["attempt"] != claim.attempt]  # ours replaces "interrupted"
        log_.append(_log_entry(claim.attempt, result, decision, manual))
        log_.sort(key=lambda e: int(e["attempt"]))
        values: dict[str, Any] = {"attempts_log": log_, "updated_at": now}
        if row.attempt == claim.attempt:  # still ours: no one re-claimed it after a lost lease
            values["state"] = decision.state
            values["next_attempt_at"] = decision.next_attempt_at
        await s.execute(
            update(WebhookDelivery).where(col(WebhookDelivery.webhook_id) == claim.webhook_id).values(**values)
        )
    return decision


async def release(db: Database, claim: Claim) -> None:
    """Hand an unfinished claim back (graceful stop): the row is due again at once."""
    now = time.time()
    async with db.write() as s:
        await s.execute(
            update(WebhookDelivery)
            .where(
                col(WebhookDelivery.webhook_id) == claim.webhook_id,
                col(WebhookDelivery.attempt) == claim.attempt,
            )
            .values(
                attempt=claim.attempt - 1,
                next_attempt_at=now if claim.prior_state == "pending" else None,
                updated_at=now,
            )
        )


async def attempt(
    core: Core, session: aiohttp.ClientSession, claim: Claim, *, manual: bool = False
) -> tuple[Result, Decision]:
    """Send a claimed attempt and record it; the claim is handed back if this is cancelled."""
    settings = core.settings
    try:
        result = await send(
            session, claim, allow_private=settings.webhook_allow_private, timeout_s=settings.webhook_timeout_s
        )
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(release(core.db, claim)), 5)
        raise
    decision: Decision | None = None
    for n in range(RECORD_TRIES):
        try:
            decision = await asyncio.shield(record(core.db, claim, result, settings.retry_schedule_s, manual=manual))
            break
        except Exception as exc:  # database down: the lease expires and the row is retried
            log.warning("could not record webhook attempt %s: %s", claim.webhook_id, exc)
            if n + 1 == RECORD_TRIES:
                raise
            await asyncio.sleep(0.5 * (n + 1))
    assert decision is not None
    WEBHOOK_DELIVERIES.labels(decision.outcome).inc()
    if decision.outcome == "success" and claim.attempt == 1 and not manual:
        with contextlib.suppress(Exception):
            observe_lag("webhook", event_time(orjson.loads(claim.body)), time.time())
    return result, decision


# ---- the loop ----------------------------------------------------------------------------------


class Sender:
    """One per API process: finds jobs with due deliveries and sends each job's rows in order."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.busy: dict[str, asyncio.Task[None]] = {}
        self.lease_s = core.settings.webhook_timeout_s + LEASE_MARGIN_S

    async def run(self) -> None:
        async with client_session(self.core.settings.webhook_allow_private) as session:
            try:
                await every("webhook sender", POLL_INTERVAL_S, lambda: self.tick(session))
            finally:
                tasks = list(self.busy.values())
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def tick(self, session: aiohttp.ClientSession) -> None:
        free = MAX_JOBS_IN_FLIGHT - len(self.busy)
        if free <= 0:
            return
        now = time.time()
        q = select(col(WebhookDelivery.job_id)).where(
            col(WebhookDelivery.state) == "pending", col(WebhookDelivery.next_attempt_at) <= now
        )
        if self.busy:
            q = q.where(col(WebhookDelivery.job_id).not_in(list(self.busy)))
        q = q.group_by(col(WebhookDelivery.job_id)).order_by(func.min(col(WebhookDelivery.next_attempt_at))).limit(free)
        async with self.core.db.read() as s:
            job_ids = list((await s.execute(q)).scalars().all())
        for job_id in job_ids:
            task = asyncio.create_task(self._drain_job(session, job_id))
            self.busy[job_id] = task
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        for job_id, t in list(self.busy.items()):
            if t is task:
                del self.busy[job_id]

    async def _drain_job(self, session: aiohttp.ClientSession, job_id: str) -> None:
        """Send the job's due rows one at a time, lowest seq first; stop when another process
        wins a claim (it is draining this job) or nothing is due."""
        try:
            for _ in range(ROWS_PER_TASK):
                q = (
                    _secret_query()
                    .where(
                        col(WebhookDelivery.job_id) == job_id,
                        col(WebhookDelivery.state) == "pending",
                        col(WebhookDelivery.next_attempt_at) <= time.time(),
                    )
                    .order_by(col(WebhookDelivery.seq))
                    .limit(1)
                )
                async with self.core.db.read() as s:
                    found = (await s.execute(q)).first()
                if found is None:
                    return
                row, user_id, sealed = found
                secret = secretbox.unseal(self.core.settings.signing_key, user_id, sealed)
                claim = await claim_row(self.core.db, row, secret, self.lease_s)
                if claim is None:
                    return
                await attempt(self.core, session, claim)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook sender failed on job %s", job_id)


# ---- reading and redelivering ----------------------------------------------------------------------
