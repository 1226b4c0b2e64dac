"""Settings from the environment (and an optional `.env`), with defaults that work on a laptop."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field
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
    max_sockets_per_user: int = Field(200, validation_alias=_env("ORCH_MAX_SOCKETS_PER_USER"))
    max_subscriptions_per_socket: int = Field(500, validation_alias=_env("ORCH_MAX_SUBSCRIPTIONS_PER_SOCKET"))
    task_costs: dict[str, int] = Field(default_factory=dict, validation_alias=_env("ORCH_TASK_COSTS"))
    task_timeouts: dict[str, int] = Field(default_factory=dict, validation_alias=_env("ORCH_TASK_TIMEOUTS"))
    ws_outbox_messages: int = Field(2048, validation_alias=_env("ORCH_WS_OUTBOX_MESSAGES"))
    """Messages held for one socket; a consumer that falls this far behind is closed with 1013."""
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

    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'orchestrator.db').resolve()}"

    @cached_property
    def redis(self) -> str:
        return self.redis_url or "redis://127.0.0.1:6379/0"

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

            self.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_urlsafe(32))
            tmp.replace(path)
        return path.read_text().strip()


def get_settings() -> Settings:
    return Settings()
