"""SQL tables (SQLModel). Times are float unix seconds: portable across SQLite and Postgres."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 2


class SchemaVersion(SQLModel, table=True):
    __tablename__ = "schema_version"
    version: int = Field(primary_key=True)
    applied_at: float


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: str = Field(primary_key=True)
    name: str = Field(index=True, unique=True)
    api_key_hash: str = Field(index=True, unique=True)
    webhook_secret: str  # sealed: see orchestrator/core/secretbox.py
    credits: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    created_at: float


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_user_created", "user_id", "created_at", "id"),
        Index("ix_jobs_status_updated", "status", "updated_at"),
    )
    id: str = Field(primary_key=True)
    user_id: str = Field(foreign_key="users.id")
    type: str
    queue: str
    status: str
    progress: float = 0.0
    message: str | None = None
    input: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    attempts: int = 0
    seq: int = 0
    cost: int = 0
    refunded: int = 0
    eta_seconds: float | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = Field(default=None, sa_column=Column(JSON))
    provider_request_id: str | None = None
    worker_name: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float


class JobEvent(SQLModel, table=True):
    __tablename__ = "job_events"
    job_id: str = Field(primary_key=True, foreign_key="jobs.id")
    seq: int = Field(primary_key=True)
    type: str
    status: str
    progress: float
    message: str | None = None
    data: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    actor: str
    eta_seconds: float | None = None
    ts: float


class LedgerEntry(SQLModel, table=True):
    __tablename__ = "ledger"
    __table_args__ = (
        # A job is charged once and refunded at most once, whatever retries happen.
        UniqueConstraint("job_id", "reason", name="uq_ledger_job_reason"),
        Index("ix_ledger_user_id", "user_id", "id"),
    )
    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="users.id")
    job_id: str | None = None
    delta: int
    reason: str
    balance_after: int
    created_at: float


class IdempotencyKey(SQLModel, table=True):
    __tablename__ = "idempotency_keys"
    user_id: str = Field(primary_key=True)
    key: str = Field(primary_key=True)
    request_hash: str
    job_id: str | None = None
    created_at: float


class WebhookDelivery(SQLModel, table=True):
    """One row per (job, seq) webhook message; attempts are kept in `attempts_log`."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_due", "state", "next_attempt_at"),)
    webhook_id: str = Field(primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", index=True)
    seq: int
    url: str
    body: str
    state: str  # pending, delivered, failed
    attempt: int = 0
    next_attempt_at: float | None = None
    attempts_log: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: float
    updated_at: float
