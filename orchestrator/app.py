"""The aiohttp application: `create_app(settings)` wires routes, the gateway and background work."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import mimetypes
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from metrics.exporter import render as render_metrics
from metrics.realtime import tune_gc
from orchestrator.api import openapi, uploads, webhooks
from orchestrator.api.origins import Origins, cors_on_prepare, origins_middleware
from orchestrator.api.routes import API_ROUTES
from orchestrator.core.services import Core
from orchestrator.core.tasktypes import QUEUES
from orchestrator.delivery.channels import durable_channels
from orchestrator.fal import webhook as fal_webhook
from orchestrator.settings import Settings
from orchestrator.web import CORE, core, errors_middleware, json_response
from queues.dispatch import Dispatcher
from queues.registry import build_registry
from ws_gateway.access import ACCESS, Access
from ws_gateway.collector import COLLECTOR
from ws_gateway.hub import hub_ctx
from ws_gateway.limits import SocketSlots
from ws_gateway.websocket import SOCKET_SLOTS, SOCKETS, close_all_sockets, ws_handler

STATIC_DIR = Path(__file__).parent / "api" / "static"
SETTINGS = web.AppKey("settings", Settings)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks = await core(request).readiness()
    down = [k for k, v in checks.items() if v != "ok"]
    if down:
        return json_response(
            {"error": {"code": "UNAVAILABLE", "message": f"down: {', '.join(down)}", "details": checks}},
            status=503,
        )
    return json_response({"status": "ready", "checks": checks})


async def metrics(request: web.Request) -> web.Response:
    c = core(request)
    body = await asyncio.to_thread(render_metrics, c.redis, QUEUES)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI])


async def artifact(request: web.Request) -> web.StreamResponse:
    mi = request.match_info
    path = core(request).artifacts.path(mi["job_id"], mi["token"], mi["name"])
    if path is None:
        return json_response({"error": {"code": "NOT_FOUND", "message": "artifact not found"}}, status=404)
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return web.FileResponse(path, headers={"Content-Type": ctype, "Cache-Control": "private, max-age=86400"})


async def console(request: web.Request) -> web.StreamResponse:
    index = STATIC_DIR / "index.html"
    if not index.exists():
        return web.Response(text="orchestrator API: see /api/openapi.json", content_type="text/plain")
    return web.FileResponse(index, headers={"Cache-Control": "no-cache"})


STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".ts": "application/typescript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
"""Types by suffix for the files under /static (mimetypes knows no `.d.ts`, and maps `.ts` to video)."""


async def static_file(request: web.Request) -> web.StreamResponse:
    """A file of orchestrator/api/static by name (no subfolders, so no path can leave it)."""
    name = request.match_info["name"]
    path = STATIC_DIR / name
    ctype = STATIC_TYPES.get(path.suffix)
    if "/" in name or name.startswith(".") or ctype is None or not path.is_file():
        return json_response({"error": {"code": "NOT_FOUND", "message": "no such file"}}, status=404)
    return web.FileResponse(path, headers={"Content-Type": ctype, "Cache-Control": "no-cache"})


OPENAPI = web.AppKey("openapi", dict)


async def open_core(settings: Settings, create_schema: bool = True) -> Core:
    """The core of an API process, with RQ as its dispatcher and the durable channels."""
    return await Core.open(
        settings,
        registry=build_registry(settings),
        make_dispatcher=Dispatcher,
        channels=durable_channels(),
        create_schema=create_schema,
    )


ROUTES = [*API_ROUTES, *webhooks.ROUTES, *uploads.ROUTES, *fal_webhook.ROUTES]
"""Every /api route: the app mounts them and /api/openapi.json documents them."""


async def core_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    c = await open_core(settings)
    app[CORE] = c
    slots = SocketSlots(c.aredis, settings.max_sockets_per_user, settings.slot_ttl_s)
    app[SOCKET_SLOTS] = slots
    app[ACCESS] = Access(c)
    heartbeat = asyncio.create_task(slots.heartbeat(), name="socket-slots")
    collector = asyncio.create_task(COLLECTOR.run(), name="gc-policy")
    # everything loaded so far lives as long as the process: keep it out of the collector's
    # full passes, which otherwise walk it every time and stall every socket meanwhile
    gc.collect()
    gc.freeze()
    tune_gc()
    yield
    for task in (heartbeat, collector):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await slots.forget()
    await c.close()


async def background_ctx(app: web.Application) -> AsyncIterator[None]:
    """Webhook sender and sweeper, when their modules are present."""
    from orchestrator.background.start import start_background

    tasks = start_background(app[CORE])
    yield
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    origins = Origins(settings)
    app = web.Application(
        middlewares=[origins_middleware(origins), errors_middleware],
        client_max_size=settings.max_body_bytes,
        # subscribe tokens travel in the query string: allow long request lines and headers
        handler_args={"max_line_size": 65536, "max_field_size": 65536},
    )
    app[SETTINGS] = settings
    app[OPENAPI] = openapi.build(ROUTES)
    app[SOCKETS] = set()
    app.cleanup_ctx.append(core_ctx)
    app.cleanup_ctx.append(hub_ctx)
    app.cleanup_ctx.append(background_ctx)
    app.on_shutdown.append(close_all_sockets)
    app.on_response_prepare.append(cors_on_prepare(origins))
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/openapi.json", openapi_json)
    app.router.add_get("/artifacts/{job_id}/{token}/{name}", artifact)
    app.router.add_get("/", console)
    app.router.add_get("/static/{name}", static_file)
    return app
