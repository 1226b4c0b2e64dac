"""The public JSON shapes, one pydantic model each: REST requests and responses, the job resource and
its events as REST, WebSocket, SSE and webhooks carry them (the tests check those payloads against
these models). They validate requests and generate /api/openapi.json."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from orchestrator.states import JobStatus

Status = JobStatus
WebhookEvent = Literal["queued", "running", "progress", "completed", "failed", "cancelled", "timed_out"]


MAX_SEQ = 2_147_483_647
"""Event numbers, ledger ids and cursors fit the database's 32-bit integers."""


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SubmitRequest(ApiModel):
    type: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    webhook_url: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    webhook_events: Annotated[list[WebhookEvent], Field(min_length=1, max_length=7)] | None = None


class TokenRequest(ApiModel):
    job_ids: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=100)] | None = None
    ttl_seconds: Annotated[int, Field(ge=1, le=3600)] = 600


class ListQuery(ApiModel):
    status: Status | None = None
    type: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    queue: Literal["train", "generate"] | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    cursor: Annotated[str, Field(max_length=512)] | None = None


class LedgerQuery(ApiModel):
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    cursor: Annotated[str, Field(pattern=r"^[0-9]{1,9}$")] | None = None


class EventsQuery(ApiModel):
    after: Annotated[int, Field(ge=0, le=MAX_SEQ)] = 0


class JobQuery(ApiModel):
    wait_seconds: Annotated[float, Field(ge=0, le=60)] | None = None
    after_seq: Annotated[int, Field(ge=0, le=MAX_SEQ)] | None = None


class StreamQuery(ApiModel):
    since: Annotated[int, Field(ge=0, le=MAX_SEQ)] | None = None
    token: Annotated[str, Field(max_length=4096)] | None = None


# ---- responses (documentation) --------------------------------------------------------------


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Artifact(BaseModel):
    url: str
    contentType: str
    bytes: int


class Credits(BaseModel):
    charged: int
    refunded: int


class JobLinks(BaseModel):
    self: str
    events: str
    stream: str
    ws: str


class JobError(BaseModel):
    code: str
    message: str


class JobResource(BaseModel):
    jobId: str
    type: str
    queue: str
    status: Status
    progress: float
    message: str | None
    input: dict[str, Any]
    result: dict[str, Any] | None
    error: JobError | None
    attempts: int
    seq: int
    etaSeconds: float | None = None
    credits: Credits
    createdAt: str
    startedAt: str | None
    finishedAt: str | None
    updatedAt: str
    webhookUrl: str | None
    links: JobLinks


class Event(BaseModel):
    jobId: str
    seq: int
    type: Literal["status", "progress", "log"]
    status: Status
    progress: float
    message: str | None
    data: dict[str, Any] | None
    error: JobError | None
    actor: str
    ts: str
    etaSeconds: float | None = None


class JobList(BaseModel):
    jobs: list[JobResource]
    nextCursor: str | None


class EventList(BaseModel):
    events: list[Event]


class TypeInfo(BaseModel):
    type: str
    queue: str
    cost: int
    timeoutSeconds: int
    inputSchema: dict[str, Any]


class TypeList(BaseModel):
    types: list[TypeInfo]


class Me(BaseModel):
    userId: str
    name: str
    credits: int


class LedgerItem(BaseModel):
    id: str
    jobId: str | None
    delta: int
    reason: str
    balanceAfter: int
    createdAt: str


class LedgerList(BaseModel):
    entries: list[LedgerItem]
    nextCursor: str | None


class TokenResponse(BaseModel):
    token: str
    expiresAt: str


class Delivery(BaseModel):
    webhookId: str
    seq: int
    attempt: int
    statusCode: int | None
    error: str | None
    latencyMs: float | None
    at: str | None
    nextAttemptAt: str | None
    state: str


class DeliveryList(BaseModel):
    deliveries: list[Delivery]
