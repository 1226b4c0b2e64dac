"""aiohttp plumbing shared by every route: JSON in and out, validation, errors, auth."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from metrics import http as http_metrics
from orchestrator.core.auth import Principal, authenticate
from orchestrator.core.services import Core
from orchestrator.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    RateLimited,
    ValidationFailed,
)

log = logging.getLogger(__name__)
CORE = web.AppKey("core", Core)
PRINCIPAL = "principal"
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(err: ApiError) -> web.Response:
    headers = {}
    if isinstance(err, RateLimited):
        headers["Retry-After"] = str(err.retry_after_s)
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return json_response(err.body(), status=err.status, headers=headers)


def core(request: web.Request) -> Core:
    return request.app[CORE]


async def read_json(request: web.Request) -> Any:
    limit = core(request).settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    try:
        raw = await request.read()  # stops reading once the app's client_max_size is passed
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"request body over {limit} bytes") from exc
    except ValueError as exc:
        raise BadRequest("unreadable body") from exc
    if not raw.strip():
        raise BadRequest("request body must be a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc


MAX_FIELD_ERRORS = 50
"""At most this many entries in a 422's `details` (one more says how many were left out)."""
MAX_ERROR_TEXT = 200
"""Characters kept of each field path and message: with MAX_FIELD_ERRORS this bounds a 422 body
to a few tens of KiB whatever the request held (70,000 unknown keys once made a 7.5 MB answer)."""


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"


def validation_details(exc: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    """One entry per failed field, the first MAX_FIELD_ERRORS of them, each clipped."""
    out: list[dict[str, Any]] = []
    for e in exc.errors(include_url=False, include_input=False)[:MAX_FIELD_ERRORS]:
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(e["loc"]))
        out.append({"field": _clip(path or "(body)"), "message": _clip(e["msg"]), "type": e["type"]})
    left_out = exc.error_count() - len(out)
    if left_out > 0:
        out.append({"field": "(more)", "message": f"{left_out} more errors not shown", "type": "truncated"})
    return out


def validate(model: type[M], data: Any, prefix: str = "") -> M:
    if not isinstance(data, dict):
        raise ValidationFailed(
            f"{prefix or 'body'} must be a JSON object",
            details=[{"field": prefix or "(body)", "message": "not an object"}],
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = validation_details(exc, prefix)
        fields = ", ".join(d["field"] for d in details[:MAX_FIELD_ERRORS])
        more = f" and {exc.error_count() - MAX_FIELD_ERRORS} more" if exc.error_count() > MAX_FIELD_ERRORS else ""
        raise ValidationFailed(f"invalid fields: {fields}{more}", details=details) from exc


def query(request: web.Request, model: type[M]) -> M:
    params: dict[str, Any] = {}
    for k in request.query:
        values = request.query.getall(k)
        params[k] = values[0] if len(values) == 1 else values
    return validate(model, params)


async def principal(request: web.Request, allow_token: bool = False) -> Principal:
    token = request.query.get("token") if allow_token else None
    c = core(request)
    p = await authenticate(c.db, c.tokens, request.headers.get("Authorization"), token, allow_token, c.keys)
    request[PRINCIPAL] = p
    return p


async def full_access(request: web.Request) -> Principal:
    p = await principal(request, allow_token=True)
    if p.subscribe_only:
        raise Forbidden("a subscribe token can only read events (/ws and /api/jobs/{id}/stream)")
    return p


def _http_error(exc: web.HTTPException) -> ApiError:
    codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE", 400: "BAD_REQUEST"}
    err = ApiError(exc.reason or "error", code=codes.get(exc.status, "HTTP_ERROR"))
    err.status = exc.status
    return err


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except ApiError as err:
        status = err.status
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            status = exc.status
            raise
        status = exc.status
        return error_response(_http_error(exc))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError("internal error"))
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        http_metrics.observe(request.method, name, status, time.perf_counter() - start)


@dataclass(frozen=True)
class Route:
    """One HTTP route: the app mounts its handler and /api/openapi.json documents it."""

    method: str
    path: str
    handler: Any
    summary: str
    response: type[BaseModel] | None
    status: int = 200
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    auth: str = "key"  # key, token (key or subscribe token), none
    tag: str = "jobs"
