"""Settings from the environment (and an optional `.env`), with defaults that work on a laptop."""

from __future__ import annotations

import math
import os
from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_RETRY_SCHEDULE_S = "5,300,1800,7200,18000,36000,36000"


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    redis_url: str = Field("", validation_alias=_env("REDIS_URL"))
    database_url: str = Field("", validation_alias=_env("DATABASE_URL"))
    host: str = Field("127.0.0.1", validation_alias=_env("ORCH_HOST"))
    port: int = Field(8080, validation_alias=_env("ORCH_PORT"))
    data_dir: Path = Field(Path("./.orchestrator"), validation_alias=_env("ORCH_DATA_DIR"))
    public_url: str = Field("", validation_alias=_env("ORCH_PUBLIC_URL"))
    webhook_allow_private: bool = Field(False, validation_alias=_env("ORCH_WEBHOOK_ALLOW_PRIVATE"))
    webhook_retry_schedule: str = Field(DEFAULT_RETRY_SCHEDULE_S, validation_alias=_env("ORCH_WEBHOOK_RETRY_SCHEDULE"))
    webhook_timeout_s: float = Field(15.0, validation_alias=_env("ORCH_WEBHOOK_TIMEOUT"))
    worker_lost_after_s: float = Field(60.0, validation_alias=_env("ORCH_WORKER_LOST_AFTER"))
    retention_days: float = Field(7.0, validation_alias=_env("ORCH_RETENTION_DAYS"))
    metrics_port: int = Field(0, validation_alias=_env("ORCH_METRICS_PORT"))
    max_body_bytes: int = Field(1024 * 1024, validation_alias=_env("ORCH_MAX_BODY_BYTES"))
    secret_key: str = Field("", validation_alias=_env("ORCH_SECRET_KEY"))
    submit_rate: str = Field("600/minute", validation_alias=_env("ORCH_SUBMIT_RATE"))
    redeliver_rate: str = Field("30/minute", validation_alias=_env("ORCH_REDELIVER_RATE"))
    """Per user: POST .../deliveries/{id}/redeliver calls (each makes an outbound request now)."""
    api_key_cache_s: float = Field(5.0, ge=0, le=300, validation_alias=_env("ORCH_API_KEY_CACHE_SECONDS"))
    """How long an API process trusts what an API key resolved to (a revoked key works that long)."""
    max_sockets_per_user: int = Field(200, validation_alias=_env("ORCH_MAX_SOCKETS_PER_USER"))
    max_subscriptions_per_socket: int = Field(500, validation_alias=_env("ORCH_MAX_SUBSCRIPTIONS_PER_SOCKET"))
    task_costs: dict[str, int] = Field(default_factory=dict, validation_alias=_env("ORCH_TASK_COSTS"))
    task_timeouts: dict[str, int] = Field(default_factory=dict, validation_alias=_env("ORCH_TASK_TIMEOUTS"))
    ws_outbox_messages: int = Field(2048, validation_alias=_env("ORCH_WS_OUTBOX_MESSAGES"))
    """Messages held for one socket; a consumer that falls this far behind is closed with 1013."""
    slot_ttl_s: float = Field(30.0, validation_alias=_env("ORCH_SLOT_TTL_SECONDS"))
    """A dead API process's sockets and streams stop counting against their users after this long."""
    redis_max_connections: int = Field(32, validation_alias=_env("ORCH_REDIS_MAX_CONNECTIONS"))
    """Connections each Redis pool of an API process may open; more callers wait for one."""
    task_modules: str = Field("", validation_alias=_env("ORCH_TASK_MODULES"))
    task_max_attempts: dict[str, int] = Field(default_factory=dict, validation_alias=_env("ORCH_TASK_MAX_ATTEMPTS"))
    requeue_after_s: float = Field(10.0, validation_alias=_env("ORCH_REQUEUE_AFTER"))
    """A queued job that Redis does not hold is enqueued again after this long."""
    sweep_interval_s: float = Field(5.0, validation_alias=_env("ORCH_SWEEP_INTERVAL"))
    fal_key: str = Field("", validation_alias=_env("FAL_KEY"))
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, validation_alias=_env("ORCH_MAX_UPLOAD_BYTES"))
    """The largest file `POST /api/uploads` takes."""
    upload_quota_bytes: int = Field(1024 * 1024 * 1024, ge=1, validation_alias=_env("ORCH_UPLOAD_QUOTA_BYTES"))
    """What one user's uploads may hold at once (they expire with ORCH_RETENTION_DAYS)."""
    log_level: str = Field("INFO", validation_alias=_env("ORCH_LOG_LEVEL"))
    cors_origins: str = Field("", validation_alias=_env("ORCH_CORS_ORIGINS"))
    """Comma separated browser origins (`https://app.example`) given CORS on /api and artifacts."""
    ws_allow_any_origin: bool = Field(False, validation_alias=_env("ORCH_WS_ALLOW_ANY_ORIGIN"))
    """Let /ws accept any Origin (else: listed in ORCH_CORS_ORIGINS or the API's own)."""

    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'orchestrator.db').resolve()}"

    @cached_property
    def redis(self) -> str:
        return self.redis_url or "redis://127.0.0.1:6379/0"

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _valid_schedule(cls, value: str) -> str:
        """Checked at start-up, so a typo stops the process instead of the first failed webhook."""
        parts = [x.strip() for x in value.split(",") if x.strip()]
        if not 1 <= len(parts) <= 50:
            raise ValueError("ORCH_WEBHOOK_RETRY_SCHEDULE: 1 to 50 comma-separated seconds")
        for x in parts:
            try:
                s = float(x)
            except ValueError:
                raise ValueError(f"ORCH_WEBHOOK_RETRY_SCHEDULE: {x!r} is not a number of seconds") from None
            if not math.isfinite(s) or not 0 < s <= 30 * 86400:
                raise ValueError(f"ORCH_WEBHOOK_RETRY_SCHEDULE: {x!r} must be above 0 and at most 30 days")
        return value

    @property
    def retry_schedule_s(self) -> list[float]:
        return [float(x) for x in self.webhook_retry_schedule.split(",") if x.strip()]

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @cached_property
    def signing_key(self) -> str:
        """Key for subscribe tokens and artifact links: ORCH_SECRET_KEY, else one kept in the data dir."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret.key"
        if not path.exists():
            import secrets

            private_dir(self.data_dir)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
            try:
                os.link(tmp, path)  # first writer wins: concurrent starts agree on one key
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_text().strip()


def private_dir(path: Path) -> Path:
    """Create `path` and any missing parents, each 0700 (an existing directory is left as it is):
    the data dir holds the signing key, the SQLite file and artifacts."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            pass
    return path
