"""Browsers on other origins: CORS for the listed origins, and an Origin check on `/ws`.

Guarantees:
- Origins in `ORCH_CORS_ORIGINS` get CORS on `/api` routes (SSE streams included) and artifacts:
  preflights are answered, every response (errors and streams too) names the origin and exposes
  the headers clients read. Credentials are never allowed: auth is a bearer token, not a cookie.
- `/ws` refuses, with 403 before the upgrade, an `Origin` that is neither listed nor the API's
  own, unless `ORCH_WS_ALLOW_ANY_ORIGIN=1`. A request without an `Origin` (not a browser) passes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from orchestrator.errors import Forbidden
from orchestrator.settings import Settings
from orchestrator.web import Handler, error_response

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, If-None-Match, Last-Event-ID"
EXPOSE_HEADERS = "Location, ETag, Retry-After, Idempotent-Replayed"
PREFLIGHT_MAX_AGE_S = "600"


def normalize(origin: str) -> str:
    """`scheme://host[:port]`, lower case, without a trailing slash or path."""
    parts = urlsplit(origin.strip().lower())
    if not parts.scheme or not parts.netloc:
        return origin.strip().lower().rstrip("/")
    return f"{parts.scheme}://{parts.netloc}"


class Origins:
    """Which browser origins may call the API (CORS) and open sockets."""

    def __init__(self, settings: Settings) -> None:
        listed = {normalize(o) for o in settings.cors_origins.split(",") if o.strip()}
        self.any_cors = "*" in listed
        self.listed = frozenset(listed - {"*"})
        self.ws_any = settings.ws_allow_any_origin
        self.own = normalize(settings.public_url) if settings.public_url else ""

    def cors_allows(self, origin: str) -> bool:
        return self.any_cors or normalize(origin) in self.listed

    def ws_allows(self, origin: str, host: str) -> bool:
        """Listed, or the API's own: the Host the request came to, or ORCH_PUBLIC_URL's origin."""
        if self.ws_any or self.cors_allows(origin):
            return True
        o = normalize(origin)
        return urlsplit(o).netloc == host.lower() or (bool(self.own) and o == self.own)


def _cors_path(path: str) -> bool:
    return path == "/api" or path.startswith(("/api/", "/artifacts/"))


def _cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSE_HEADERS}


def _add_vary(response: web.StreamResponse) -> None:
    vary = response.headers.get("Vary", "")
    if "origin" not in vary.lower():
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


def origins_middleware(origins: Origins) -> Middleware:
    """Answers CORS preflights and refuses foreign origins on `/ws`; runs before auth."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        if request.path == "/ws" and not origins.ws_allows(origin, request.host):
            return error_response(Forbidden(f"origin {origin[:200]} may not open sockets here"))
        if (
            request.method == "OPTIONS"
            and _cors_path(request.path)
            and "Access-Control-Request-Method" in request.headers
        ):
            if not origins.cors_allows(origin):
                return error_response(Forbidden(f"origin {origin[:200]} is not allowed"))
            headers = _cors_headers(origin) | {
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_S,
                "Vary": "Origin",
            }
            return web.Response(status=204, headers=headers)
        return await handler(request)

    return middleware


def cors_on_prepare(origins: Origins) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """A response-prepare hook: CORS headers on every answer to a listed origin, streams included
    (their headers leave before the handler returns, so a middleware would be too late)."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None or not _cors_path(request.path) or not origins.cors_allows(origin):
            return
        response.headers.update(_cors_headers(origin))
        _add_vary(response)

    return on_prepare
