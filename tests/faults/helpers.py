"""Process surgery and the invariants every fault test ends with."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from sqlalchemy import text

from orchestrator.states import FINAL
from orchestrator.store.db import Database


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def kill_worker_hard(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker and its work horses, as a machine crash would."""
    horses = children_of(proc.pid)
    for pid in [proc.pid, *horses]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


async def check_invariants(db: Database, user_ids: list[str] | None = None) -> dict[str, object]:
    """Every job final, every event sequence gapless, each refund once, balances equal ledgers."""
    async with db.read() as s:
        jobs = (await s.execute(text("SELECT id, status, seq, cost, refunded, user_id FROM jobs"))).all()
        events = (await s.execute(text("SELECT job_id, seq, type, status FROM job_events ORDER BY job_id, seq"))).all()
        ledger = (await s.execute(text("SELECT user_id, job_id, delta, reason FROM ledger"))).all()
        users = (await s.execute(text("SELECT id, credits FROM users"))).all()
    by_job: dict[str, list[tuple[int, str, str]]] = {}
    for job_id, seq, kind, status in events:
        by_job.setdefault(job_id, []).append((seq, kind, status))
    problems: list[str] = []
    statuses: dict[str, int] = {}
    for job_id, status, seq, cost, refunded, _user in jobs:
        statuses[status] = statuses.get(status, 0) + 1
        if status not in FINAL:
            problems.append(f"{job_id} is {status}")
        seqs = [e[0] for e in by_job.get(job_id, [])]
        if seqs != list(range(1, seq + 1)):
            problems.append(f"{job_id} events {seqs[:5]}… not 1..{seq}")
        finals = [e for e in by_job.get(job_id, []) if e[1] == "status" and e[2] in FINAL]
        if len(finals) != 1:
            problems.append(f"{job_id} has {len(finals)} final events")
        refunds = [r for r in ledger if r[1] == job_id and r[3] == "refund"]
        charges = [r for r in ledger if r[1] == job_id and r[3] == "charge"]
        want_refund = status in ("failed", "cancelled", "timed_out") and cost > 0
        if len(charges) != 1 or len(refunds) != (1 if want_refund else 0):
            problems.append(f"{job_id} ({status}) has {len(charges)} charges and {len(refunds)} refunds")
        if want_refund and refunded != cost:
            problems.append(f"{job_id} refunded {refunded} of {cost}")
    balances_ok = 0
    for user_id, credits in users:
        total = sum(r[2] for r in ledger if r[0] == user_id)
        if total != credits:
            problems.append(f"user {user_id} balance {credits} != ledger {total}")
        else:
            balances_ok += 1
    return {
        "jobs": len(jobs),
        "statuses": dict(sorted(statuses.items())),
        "events": len(events),
        "gapless": sum(1 for j in jobs if [e[0] for e in by_job.get(j[0], [])] == list(range(1, j[2] + 1))),
        "refunds": sum(1 for r in ledger if r[3] == "refund"),
        "balances_equal_ledger": f"{balances_ok}/{len(users)}",
        "problems": problems,
    }
