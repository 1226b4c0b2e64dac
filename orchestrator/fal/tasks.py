"""`fal.*` task types: run a fal.ai model through fal's queue without holding a worker.

    worker: handler ── submit (fal_webhook=…?token=) ──▶ fal          (job stays `queued`)
              │  ctx.handoff("fal", request_id)   (stores provider_request_id, `log` event)
              └─ puts the job on the poll schedule (`orch:fal:due`), returns
    fal ── POST /api/providers/fal/webhook/{jobId}?token= ──▶ API ── settle() ─┐
    API process: fal_poll loop ── status, logs, queue position ──── settle() ──┴▶ lifecycle

Both the webhook (orchestrator.fal.webhook) and the poller (orchestrator.fal.poller) finish a
job through `settle`, under a per-job Redis lock, so one outcome is recorded once: whoever comes
second finds the job final (or the lock held) and changes nothing.

Configuration (environment, read once per process by `fal_settings()`):
`ORCH_FAL_MODELS` (JSON, the types, their models and a cost per model, merged over
`DEFAULT_MODELS`),
`ORCH_FAL_POLL_SCHEDULE` (seconds between polls, the last repeats), `ORCH_FAL_POLL_MAX_ERRORS`,
`ORCH_FAL_SUBMIT_ATTEMPTS`, `ORCH_FAL_COPY_ARTIFACTS`, `ORCH_FAL_MAX_ARTIFACT_BYTES`,
`ORCH_FAL_VERIFY_WEBHOOKS` (on by default), `ORCH_FAL_JWKS_URL`, `ORCH_FAL_FILES_ALLOW_PRIVATE`.
See docs/fal.md.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import functools
import hashlib
import hmac
import logging
import mimetypes
import os
import posixpath
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urljoin, urlparse

import httpx
import orjson
import redis
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator import keys
from orchestrator.core import uploads
from orchestrator.core.artifacts import ArtifactStore
from orchestrator.core.tasktypes import TaskError, TaskInput, TaskType
from orchestrator.delivery.ssrf import check_url
from orchestrator.errors import IllegalTransition, JobCancelled, NotFound, ValidationFailed
from orchestrator.fal.api import AsyncFalAPI, FalAPI, FalError
from orchestrator.states import FINAL
from orchestrator.store.tables import Job

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from orchestrator.core.lifecycle import Lifecycle
    from orchestrator.core.ports import TaskContext
    from orchestrator.settings import Settings

log = logging.getLogger(__name__)

ACTOR = "provider:fal"
PROVIDER = "fal"
DUE = f"{keys.PREFIX}:fal:due"
"""Sorted set: job id → when it is next polled (unix s). One member per fal job being watched."""
LOCK_TTL_MS = 120_000
"""The settle lock outlives a slow download; a crashed holder frees it after this."""
STATE_TTL_S = 86_400
"""Poll state is kept this long past the job's own timeout."""
MAX_FILES = 50
MAX_REDIRECTS = 5
"""Redirects followed when fetching one result file (each hop is checked)."""
MAX_OUTPUT_JSON_BYTES = 64 * 1024
"""fal's raw output is kept in the result (`output`) only when it is this small."""
MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*){1,5}$"
"""A fal endpoint id (`owner/app[/path]`); no empty or dot-leading segments."""


# --- configuration ---------------------------------------------------------------------------


class FalModelSpec(BaseModel):
    """One `fal.*` type. In ORCH_FAL_MODELS keys are camelCase (`timeoutSeconds`)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    model: str = Field(pattern=MODEL_ID)
    queue: str = "generate"
    cost: int = Field(1, ge=0)
    timeout_s: int = Field(900, ge=10, validation_alias=AliasChoices("timeoutSeconds", "timeout_s"))
    models: dict[str, int] | list[str] | None = None
    """Endpoint ids a job may ask for besides `model` (fnmatch patterns): a map pattern → cost,
    or a list (at the type's `cost`). None: only `model`. Anything else is MODEL_NOT_ALLOWED."""
    requires: list[str] = Field(default_factory=list)
    """`arguments` every job of the type must give (an input image, a prompt)."""
    description: str = ""

    def price(self, model: str) -> int | None:
        """The cost of running `model` under this type, or None when it is not allowed."""
        if model == self.model:
            return self.cost
        allowed = self.models if isinstance(self.models, dict) else dict.fromkeys(self.models or [], self.cost)
        for pattern, cost in allowed.items():
            if fnmatch.fnmatchcase(model, pattern):
                return int(cost)
        return None


DEFAULT_MODELS: dict[str, FalModelSpec] = {
    "fal.image": FalModelSpec(
        model="fal-ai/flux/schnell", queue="generate", cost=3, timeout_s=600, description="Text to image on fal"
    ),
    "fal.upscale": FalModelSpec(
        model="fal-ai/clarity-upscaler",
        queue="generate",
        cost=3,
        timeout_s=900,
        requires=["image_url"],
        description="Upscale an image on fal (arguments.image_url: an upload, an artifact or a URL)",
    ),
    "fal.edit": FalModelSpec(
        model="fal-ai/flux-pro/kontext",
        queue="generate",
        cost=4,
        timeout_s=900,
        requires=["prompt", "image_url"],
        description="Edit an image by an instruction on fal (arguments.prompt, arguments.image_url)",
    ),
    "fal.lora": FalModelSpec(
        model="fal-ai/flux-lora-fast-training",
        queue="train",
        cost=20,
        timeout_s=3600,
        description="Train a FLUX LoRA on fal",
    ),
}


class FalSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    models: dict[str, dict[str, Any] | str | None] = Field(
        default_factory=dict, validation_alias=AliasChoices("ORCH_FAL_MODELS")
    )
    poll_schedule: str = Field("1,2,4,8,16,30", validation_alias=AliasChoices("ORCH_FAL_POLL_SCHEDULE"))
    poll_max_errors: int = Field(8, ge=1, validation_alias=AliasChoices("ORCH_FAL_POLL_MAX_ERRORS"))
    """Consecutive failed status calls (5xx, 429, network) before the job fails PROVIDER_ERROR."""
    submit_attempts: int = Field(3, ge=1, le=10, validation_alias=AliasChoices("ORCH_FAL_SUBMIT_ATTEMPTS"))
    copy_artifacts: bool = Field(True, validation_alias=AliasChoices("ORCH_FAL_COPY_ARTIFACTS"))
    max_artifact_bytes: int = Field(200 * 1024 * 1024, validation_alias=AliasChoices("ORCH_FAL_MAX_ARTIFACT_BYTES"))
    verify_webhooks: bool = Field(True, validation_alias=AliasChoices("ORCH_FAL_VERIFY_WEBHOOKS"))
    jwks_refetch_s: float = Field(60.0, ge=0, validation_alias=AliasChoices("ORCH_FAL_JWKS_REFETCH_SECONDS"))
    """A signature no cached key verifies refetches fal's JWKS, at most once this often."""
    files_allow_private: bool = Field(False, validation_alias=AliasChoices("ORCH_FAL_FILES_ALLOW_PRIVATE"))
    """Result files may come from non-public addresses and over http (the local stand-in only)."""
    jwks_url: str = Field(
        "https://rest.alpha.fal.ai/.well-known/jwks.json", validation_alias=AliasChoices("ORCH_FAL_JWKS_URL")
    )

    def types(self) -> dict[str, FalModelSpec]:
        """DEFAULT_MODELS with ORCH_FAL_MODELS applied: an object replaces or adds a type (fields
        left out keep the default's), a string only swaps the model, null removes the type."""
        out = dict(DEFAULT_MODELS)
        for name, value in self.models.items():
            if not name.startswith("fal.") or len(name) > 64:
                raise ValueError(f"ORCH_FAL_MODELS: type names start with 'fal.' ({name!r})")
            if value is None:
                out.pop(name, None)
            elif isinstance(value, str):
                base = out.get(name, FalModelSpec(model=value))
                out[name] = base.model_copy(update={"model": FalModelSpec(model=value).model})
            elif name in out:  # the fields given replace the default's
                given = FalModelSpec.model_validate({"model": out[name].model} | value)
                out[name] = out[name].model_copy(update=given.model_dump(exclude_unset=True))
            else:
                out[name] = FalModelSpec.model_validate(value)
        return out

    def poll_delay_s(self, n: int) -> float:
        """Seconds before poll number `n` (1-based)."""
        steps = [float(x) for x in self.poll_schedule.split(",") if x.strip()] or [1.0]
        return max(0.0, steps[min(max(n, 1), len(steps)) - 1])


@functools.cache
def fal_settings() -> FalSettings:
    return FalSettings()


# --- the task types --------------------------------------------------------------------------


class FalInput(TaskInput):
    """`{"model"?: "fal-ai/…", "arguments": {…}}`: the model's arguments go to fal as given,
    except that local file URLs (uploads, artifacts) become fal storage URLs."""

    required_arguments: ClassVar[tuple[str, ...]] = ()

    model: str = Field(pattern=MODEL_ID, max_length=200)
    arguments: dict[str, Any] = Field(default_factory=dict, description="The fal model's input")

    @field_validator("arguments")
    @classmethod
    def _required(cls, value: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in cls.required_arguments if value.get(k) in (None, "")]
        if missing:
            raise ValueError(f"this type needs arguments {', '.join(missing)}")
        return value


def input_model(name: str, spec: FalModelSpec) -> type[FalInput]:
    cls = create_model(
        "FalInput_" + re.sub(r"\W", "_", name.removeprefix("fal.")),
        __base__=FalInput,
        model=(
            str,
            Field(spec.model, pattern=MODEL_ID, max_length=200, description="fal endpoint id"),
        ),
    )
    cls.required_arguments = tuple(spec.requires)
    return cls


def pricer(name: str, spec: FalModelSpec) -> Callable[[dict[str, Any]], int]:
    """`TaskType.extra["price"]`: the cost of a validated input, or 422 MODEL_NOT_ALLOWED."""

    def price(inp: dict[str, Any]) -> int:
        model = str(inp.get("model", spec.model))
        cost = spec.price(model)
        if cost is None:
            raise ValidationFailed(
                f"{name} does not run {model!r} here (ORCH_FAL_MODELS)",
                code="MODEL_NOT_ALLOWED",
                details=[{"field": "input.model", "message": "model not allowed for this type"}],
            )
        return cost

    return price


def tasks(settings: Settings) -> list[TaskType]:
    fs = fal_settings()
    return [
        TaskType(
            name=name,
            queue=spec.queue,
            input_model=input_model(name, spec),
            cost=spec.cost,
            timeout_s=spec.timeout_s,
            handler=functools.partial(submit, settings, fs, spec),
            description=spec.description or f"fal model {spec.model}",
            deferred_start=True,
            extra={"provider": PROVIDER, "on_cancel": cancel_request, "price": pricer(name, spec), "watch": watch},
        )
        for name, spec in fs.types().items()
    ]


# --- per-job secret and Redis state ----------------------------------------------------------


def webhook_token(signing_key: str, job_id: str) -> str:
    """The per-job secret in fal's callback URL: derivable from the key, nothing stored."""
    mac = hmac.new(signing_key.encode(), b"fal-webhook\0" + job_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def token_ok(signing_key: str, job_id: str, token: str) -> bool:
    return hmac.compare_digest(webhook_token(signing_key, job_id).encode(), token.encode())


def webhook_url(settings: Settings, job_id: str) -> str | None:
    if not settings.public_url:
        return None
    base = settings.public_url.rstrip("/")
    token = webhook_token(settings.signing_key, job_id)
    return f"{base}/api/providers/fal/webhook/{quote(job_id, safe='')}?token={token}"


def state_key(job_id: str) -> str:
    """Hash: request_id, model, n (polls so far), errors (in a row), logs (emitted), position."""
    return f"{keys.PREFIX}:fal:{job_id}"


def lock_key(job_id: str) -> str:
    return f"{keys.PREFIX}:fal:lock:{job_id}"


def schedule_poll(r: redis.Redis, job_id: str, delay_s: float) -> None:
    """(Re)schedule the job's poll; a job has one entry, so this replaces any earlier time."""
    r.zadd(DUE, {job_id: time.time() + delay_s})


async def watch(aredis: aioredis.Redis, job: Job) -> bool:
    """Puts a handed-off job back on the poll schedule when Redis lost it (a sweeper hook:
    `TaskType.extra["watch"]`). The request id and model come from SQL, the truth; returns
    whether anything had to be restored."""
    model = job.input.get("model")
    if not job.provider_request_id or not isinstance(model, str):
        return False
    key = state_key(job.id)
    restored = await aredis.hsetnx(key, "request_id", job.provider_request_id)
    if restored:
        await aredis.hset(key, "model", model)
        await aredis.expire(key, STATE_TTL_S)
    added = await aredis.zadd(DUE, {job.id: time.time()}, nx=True)
    return bool(restored or added)


# --- submit (the RQ handler) -----------------------------------------------------------------


def submit(settings: Settings, fs: FalSettings, spec: FalModelSpec, ctx: TaskContext, inp: FalInput) -> dict[str, Any]:
    """Queue the request at fal, hand the job off and schedule the first poll. Runs with the job
    `queued` (deferred start); fal's IN_PROGRESS starts it."""
    r = redis.Redis.from_url(settings.redis)
    try:
        key = state_key(ctx.job_id)
        known = r.hget(key, "request_id")
        if known:
            # This attempt ran before (a lost worker, a re-enqueue): the request is at fal already;
            # record the hand-off (it may be what was lost) and poll at once.
            ctx.handoff(PROVIDER, known.decode() if isinstance(known, bytes) else str(known))
            schedule_poll(r, ctx.job_id, 0)
            return {}
        api = FalAPI(key=settings.fal_key or None)
        arguments = stage_files(api, ArtifactStore(settings.artifacts_dir), inp.arguments)
        request_id = _submit_with_retries(api, fs, inp.model, arguments, webhook_url(settings, ctx.job_id))
        r.hset(key, mapping={"request_id": request_id, "model": inp.model})
        r.expire(key, spec.timeout_s + STATE_TTL_S)
        try:
            ctx.handoff(PROVIDER, request_id)
        except JobCancelled:
            _cancel_quietly(api, inp.model, request_id)
            r.delete(key)
            raise
        schedule_poll(r, ctx.job_id, fs.poll_delay_s(1))
        return {}
    finally:
        r.close()


def stage_files(api: FalAPI, store: ArtifactStore, arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` with each local file (an upload or artifact URL, checked as the job's owner's
    at submit) put into fal's storage through fal_client's `upload`, and its URL swapped for
    fal's. fal cannot reach this API's files, and they need no public URL this way."""
    staged: dict[str, str] = {}

    def to_fal(url: str) -> str:
        if url not in staged:
            path = uploads.local_path(store, url)
            if path is None:
                raise TaskError(f"input file {url} no longer exists (expired?)")
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            try:
                staged[url] = api.upload(path.read_bytes(), ctype, path.name)
            except FalError as exc:
                raise TaskError(f"fal: uploading {path.name} failed: {exc.message}", code="PROVIDER_ERROR") from exc
        return staged[url]

    out: dict[str, Any] = uploads.rewrite(arguments, to_fal, ())
    return out


def _submit_with_retries(api: FalAPI, fs: FalSettings, model: str, arguments: dict[str, Any], hook: str | None) -> str:
    # fal_client already retries 429/408/ingress errors; this covers 5xx and the rest, briefly.
    # (A retryable TaskError cannot be used: the job is still queued, and retry() needs running.)
    last: FalError | None = None
    for attempt in range(fs.submit_attempts):
        if attempt:
            time.sleep(min(2.0 ** (attempt - 1), 8.0))
        try:
            return api.submit(model, arguments, webhook_url=hook)
        except FalError as exc:
            last = exc
            if not exc.retryable:
                break
            log.warning("fal submit failed (attempt %d): %s", attempt + 1, exc.message)
    assert last is not None
    raise TaskError(f"fal: {last.message}", code="PROVIDER_ERROR", retryable=False)


async def cancel_request(job: Job) -> None:
    """Cancel a job's fal request (a cancel hook: `TaskType.extra["on_cancel"]`). Best effort:
    without the hook, the poller cancels it on its next poll."""
    model = job.input.get("model")
    if not job.provider_request_id or not isinstance(model, str):
        return
    api = AsyncFalAPI(key=fal_key_from_env())
    try:
        await api.cancel(model, job.provider_request_id)
    except FalError as exc:
        log.info("fal cancel of %s: %s", job.provider_request_id, exc.message)
    finally:
        await api.aclose()


def fal_key_from_env() -> str | None:
    return os.environ.get("FAL_KEY") or None


def _cancel_quietly(api: FalAPI, model: str, request_id: str) -> None:
    try:
        api.cancel(model, request_id)
    except FalError as exc:  # 400 ALREADY_COMPLETED, 404: nothing left to stop
        log.info("fal cancel of %s: %s", request_id, exc.message)


# --- settle: the one way a fal outcome reaches the lifecycle ---------------------------------


@dataclass
class Finisher:
    """What finishing a job needs, in an API process (webhook) or a worker (poller)."""

    lifecycle: Lifecycle
    artifacts: ArtifactStore
    aredis: aioredis.Redis
    fal: FalSettings


@dataclass(frozen=True)
class Settled:
    outcome: str  # completed, failed, charged (cancelled, but fal completed it), ignored, busy
    reason: str = ""


async def settle(
    f: Finisher, job_id: str, request_id: str, model: str, outcome: dict[str, Any] | FalError, via: str
) -> Settled:
    """Complete (with artifacts) or fail the job from fal's outcome, once.

    Idempotent: a job already final, or a request that is not the job's, changes nothing.
    `busy` means another delivery holds the job's lock; the caller tries again later.
    """
    token = await _lock(f.aredis, job_id, wait_s=10.0)
    if token is None:
        return Settled("busy", "another delivery is settling this job")
    try:
        async with f.lifecycle.db.read() as s:
            job = await s.get(Job, job_id)
        if job is None:
            raise NotFound("job not found")
        if job.provider_request_id and job.provider_request_id != request_id:
            return Settled("ignored", "not the job's fal request")
        if job.status == "cancelled" and job.refunded > 0 and not isinstance(outcome, FalError):
            # fal ran the request to the end after our cancel (a running request is only asked
            # to stop) and billed it: so does the job, and it says so.
            message = "fal completed this request after it was cancelled and billed it: the charge is kept"
            await f.lifecycle.keep_charge(job_id, message, {"provider": PROVIDER, "requestId": request_id}, ACTOR)
            return Settled("charged", "completed at fal after the cancel")
        if job.status in FINAL:
            return Settled("ignored", f"job is {job.status}")
        try:
            if isinstance(outcome, FalError):
                await f.lifecycle.fail(job_id, "PROVIDER_ERROR", f"fal: {outcome.message}"[:1000], ACTOR)
                return Settled("failed")
            result = await build_result(f, job_id, model, request_id, outcome, via)
            if job.status == "queued":
                await f.lifecycle.start(job_id, ACTOR, PROVIDER)
            await f.lifecycle.complete(job_id, result, ACTOR)
            return Settled("completed")
        except IllegalTransition as exc:  # cancelled or finished while we worked
            return Settled("ignored", str(exc))
    finally:
        await _unlock(f.aredis, job_id, token)


_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


async def _lock(aredis: aioredis.Redis, job_id: str, wait_s: float) -> str | None:
    token = secrets.token_hex(8)
    deadline = time.monotonic() + wait_s
    while True:
        if await aredis.set(lock_key(job_id), token, nx=True, px=LOCK_TTL_MS):
            return token
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.1)


async def _unlock(aredis: aioredis.Redis, job_id: str, token: str) -> None:
    try:
        await aredis.eval(_UNLOCK, 1, lock_key(job_id), token)
    except Exception as exc:  # it expires on its own
        log.warning("releasing fal lock of %s failed: %s", job_id, exc)


# --- result and artifacts --------------------------------------------------------------------


@dataclass(frozen=True)
class FalFile:
    url: str
    content_type: str | None
    file_name: str | None
    size: int | None


def output_files(output: Any) -> list[FalFile]:
    """Every fal File in a result (`{"url", "content_type"?, "file_name"?, "file_size"?}`), in
    order: `images[]`, `image`, `video`, `diffusers_lora_file`… whatever the model returns."""
    found: list[FalFile] = []
    seen: set[str] = set()

    def walk(value: Any, depth: int) -> None:
        if depth > 6 or len(found) >= MAX_FILES:
            return
        if isinstance(value, dict):
            url = value.get("url")
            if isinstance(url, str) and urlparse(url).scheme in ("http", "https"):
                if url not in seen:
                    seen.add(url)
                    ct, name, size = value.get("content_type"), value.get("file_name"), value.get("file_size")
                    found.append(
                        FalFile(
                            url,
                            ct if isinstance(ct, str) else None,
                            name if isinstance(name, str) else None,
                            size if isinstance(size, int) else None,
                        )
                    )
                return
            for v in value.values():
                walk(v, depth + 1)
        elif isinstance(value, list):
            for v in value:
                walk(v, depth + 1)

    walk(output, 0)
    return found


async def build_result(
    f: Finisher, job_id: str, model: str, request_id: str, output: dict[str, Any], via: str
) -> dict[str, Any]:
    files = output_files(output)
    artifacts = await collect_artifacts(f.artifacts, f.fal, job_id, files)
    result: dict[str, Any] = {
        "artifacts": artifacts,
        "provider": PROVIDER,
        "model": model,
        "requestId": request_id,
        "via": via,
    }
    raw = orjson.dumps(output)
    result["output"] = output if len(raw) <= MAX_OUTPUT_JSON_BYTES else {"truncated": True, "bytes": len(raw)}
    return result


async def collect_artifacts(
    store: ArtifactStore, fs: FalSettings, job_id: str, files: list[FalFile]
) -> list[dict[str, Any]]:
    """Copy each file into the artifact store (fal's URLs expire); keep fal's URL when a copy
    fails or copying is off."""
    out: list[dict[str, Any]] = []
    if not files:
        return out
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=15), follow_redirects=False) as client:
        for i, file in enumerate(files):
            remote = {
                "url": file.url,
                "contentType": file.content_type or _guess_type(file.url),
                "bytes": file.size,
            }
            if not fs.copy_artifacts:
                out.append(remote)
                continue
            try:
                content, header_type = await download(client, file.url, fs.max_artifact_bytes, fs.files_allow_private)
                ctype = file.content_type or header_type or _guess_type(file.url)
                name = _artifact_name(i, file, ctype)
                saved = await asyncio.to_thread(store.save, job_id, name, content, ctype)
                out.append({**saved, "sourceUrl": file.url})
            except Exception as exc:
                log.warning("copying %s for job %s failed, keeping fal's URL: %s", file.url, job_id, exc)
                out.append(remote)
    return out


async def check_file_url(url: str, allow_private: bool) -> None:
    """A result file is fetched only from an https URL whose host resolves to public addresses
    (the webhook guard, orchestrator.delivery.ssrf); with `allow_private`, any http(s) URL."""
    scheme = urlparse(url).scheme
    if scheme != "https" and not (allow_private and scheme == "http"):
        raise ValueError(f"not an https URL: {url[:200]}")
    try:
        await check_url(url, allow_private)
    except ValidationFailed as exc:
        raise ValueError(f"refused {url[:200]}: {exc.message}") from exc


async def download(client: httpx.AsyncClient, url: str, limit: int, allow_private: bool) -> tuple[bytes, str | None]:
    """GET `url` (at most `limit` bytes), following redirects by hand so that every hop passes
    `check_file_url` before it is requested."""
    for _ in range(MAX_REDIRECTS + 1):
        await check_file_url(url, allow_private)
        async with client.stream("GET", url) as resp:
            if resp.is_redirect and "location" in resp.headers:
                url = urljoin(url, resp.headers["location"])
                continue
            resp.raise_for_status()
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ValueError(f"file over {limit} bytes")
                chunks.append(chunk)
            header = resp.headers.get("content-type")
            return b"".join(chunks), header.split(";")[0].strip() if header else None
    raise ValueError(f"more than {MAX_REDIRECTS} redirects")


def _guess_type(url: str) -> str:
    return mimetypes.guess_type(urlparse(url).path)[0] or "application/octet-stream"


def _artifact_name(index: int, file: FalFile, content_type: str) -> str:
    base = file.file_name or posixpath.basename(urlparse(file.url).path) or "output"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip("._-")[:100] or "output"
    if "." not in base:
        base += mimetypes.guess_extension(content_type) or ".bin"
    return f"{index}-{base}"
