"""`POST /api/providers/fal/webhook/{jobId}?token=…`: fal's callback when a request ends.

No API key: the caller proves itself with the per-job token that only our submit put into the
URL (an HMAC of the job id, checked in constant time), and with fal's own ED25519 signature
(`X-Fal-Webhook-*` headers, keys from fal's JWKS), unless ORCH_FAL_VERIFY_WEBHOOKS=0.

The outcome goes through `fal_tasks.settle`, like the poller's: a repeated or late delivery
answers 200 and changes nothing, so fal stops retrying it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal

import httpx
import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.core import jobs
from orchestrator.errors import BadRequest, NotFound, PayloadTooLarge, Unauthorized, Unavailable
from orchestrator.fal import tasks as ft
from orchestrator.fal.api import AsyncFalAPI, FalError, parse_webhook
from orchestrator.web import Route, core, json_response

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 10 * 1024 * 1024
"""fal's payload carries the model's whole output, which can outgrow the API's usual limit."""
SIGNATURE_TOLERANCE_S = 300
JWKS_TTL_S = 24 * 3600


class FalWebhookBody(BaseModel):
    """fal's callback body (documentation; parsing is `fal_api.parse_webhook`)."""

    model_config = ConfigDict(extra="allow")

    request_id: str
    gateway_request_id: str | None = None
    status: Literal["OK", "ERROR"]
    payload: dict[str, Any] | None = None
    error: str | None = None
    payload_error: str | None = None


class FalWebhookQuery(BaseModel):
    token: str = Field(description="The per-job secret from the callback URL")


class FalWebhookAck(BaseModel):
    ok: bool
    jobId: str
    outcome: Literal["completed", "failed", "charged", "ignored"]
    reason: str | None = None


async def fal_webhook(request: web.Request) -> web.Response:
    c = core(request)
    fs = ft.fal_settings()
    job_id = request.match_info["job_id"]
    if not ft.token_ok(c.settings.signing_key, job_id, request.query.get("token", "")):
        raise Unauthorized("invalid webhook token")
    raw = await _read_body(request)
    if fs.verify_webhooks and not await signature_ok(request.headers, raw, fs.jwks_url, fs.jwks_refetch_s):
        raise Unauthorized("invalid fal webhook signature")
    try:
        hook = parse_webhook(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise BadRequest(f"not a fal webhook body: {exc}") from exc
    job = await jobs.get_job(c.db, job_id, None)
    task = c.registry.get(job.type)
    if task is None or task.extra.get("provider") != ft.PROVIDER:
        raise NotFound("job not found")
    model = str(job.input.get("model", ""))
    outcome: dict[str, Any] | FalError | None = hook.outcome
    if outcome is None:  # fal could not serialise the output: fetch it
        api = AsyncFalAPI(key=c.settings.fal_key or None)
        try:
            outcome = await api.result(model, hook.request_id)
        except FalError as exc:
            if exc.retryable:
                raise Unavailable(f"fetching the result from fal failed: {exc.message}") from exc
            outcome = exc
        finally:
            await api.aclose()
    finisher = ft.Finisher(c.lifecycle, c.artifacts, c.aredis, fs)
    done = await ft.settle(finisher, job_id, hook.request_id, model, outcome, "webhook")
    if done.outcome == "busy":
        raise Unavailable(done.reason)
    return json_response({"ok": True, "jobId": job_id, "outcome": done.outcome, "reason": done.reason or None})


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"request body over {MAX_BODY_BYTES} bytes")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"request body over {MAX_BODY_BYTES} bytes")
    return raw


# --- fal's signature -------------------------------------------------------------------------


def verify_signature(
    headers: Mapping[str, str], body: bytes, public_keys: list[bytes], now: float | None = None
) -> bool:
    """fal's webhook signature: hex ED25519 over
    `{X-Fal-Webhook-Request-Id}\\n{…-User-Id}\\n{…-Timestamp}\\n{sha256 hex of the raw body}`,
    valid under any key of fal's JWKS, with the timestamp within 5 minutes."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError as exc:  # a dev dependency (via trustme); production needs it installed
        raise Unavailable("checking fal's webhook signature needs the 'cryptography' package") from exc

    request_id = headers.get("X-Fal-Webhook-Request-Id", "")
    user_id = headers.get("X-Fal-Webhook-User-Id", "")
    timestamp = headers.get("X-Fal-Webhook-Timestamp", "")
    signature_hex = headers.get("X-Fal-Webhook-Signature", "")
    if not (request_id and user_id and timestamp.isdigit() and signature_hex):
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > SIGNATURE_TOLERANCE_S:
        return False
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError:
        return False
    message = "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()
    for key in public_keys:
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
            return True
        except (InvalidSignature, ValueError):
            continue
    return False


_jwks_cache: dict[str, tuple[float, list[bytes]]] = {}


async def signature_ok(headers: Mapping[str, str], body: bytes, jwks_url: str, refetch_after_s: float) -> bool:
    """fal's signature under the cached keys; when none verifies (fal's headers name no key, so
    an unknown key looks like this), the JWKS is fetched again, at most once per
    `refetch_after_s`, and the signature tried once more. A failed fetch lets nothing through."""
    if verify_signature(headers, body, await jwks_keys(jwks_url)):
        return True
    fetched = _jwks_cache.get(jwks_url)
    if fetched is not None and time.monotonic() - fetched[0] < refetch_after_s:
        return False
    try:
        keys = await jwks_keys(jwks_url, refresh=True)
    except Unavailable:
        return False
    return verify_signature(headers, body, keys)


async def jwks_keys(url: str, refresh: bool = False) -> list[bytes]:
    """fal's Ed25519 public keys (raw bytes), cached for a day; 503 when they cannot be had.
    `refresh` fetches them again; if that fails the cached keys stay, and an error is raised."""
    cached = _jwks_cache.get(url)
    if cached and not refresh and time.monotonic() - cached[0] < JWKS_TTL_S:
        return cached[1]
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            resp = await client.get(url)
            resp.raise_for_status()
            doc = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        if cached and not refresh:
            return cached[1]
        if cached:  # the failed attempt counts: no refetch storm
            _jwks_cache[url] = (time.monotonic(), cached[1])
        raise Unavailable(f"cannot fetch fal's webhook keys: {exc}") from exc
    found = [
        base64.urlsafe_b64decode(k["x"] + "=" * (-len(k["x"]) % 4))
        for k in doc.get("keys", [])
        if isinstance(k, dict) and k.get("kty") == "OKP" and k.get("crv") == "Ed25519" and "x" in k
    ]
    _jwks_cache[url] = (time.monotonic(), found)
    return found


ROUTES: list[Route] = [
    Route(
        "POST",
        "/api/providers/fal/webhook/{job_id}",
        fal_webhook,
        "fal.ai callback for a fal.* job (authenticated by its per-job token, not an API key)",
        FalWebhookAck,
        200,
        FalWebhookBody,
        query=FalWebhookQuery,
        auth="none",
        tag="providers",
    ),
]
