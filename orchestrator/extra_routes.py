"""Routes contributed by optional parts (webhook deliveries, provider callbacks), kept apart from
orchestrator.routes so each part owns its handlers; all of them are listed in the OpenAPI doc."""

from __future__ import annotations

from orchestrator.routes import Route


def extra_routes() -> list[Route]:
    routes: list[Route] = []
    for module in ("orchestrator.webhook_routes", "orchestrator.fal_webhook", "orchestrator.upload_routes"):
        try:
            mod = __import__(module, fromlist=["ROUTES"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        routes += mod.ROUTES
    return routes
