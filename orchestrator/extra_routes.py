"""Routes contributed by optional parts (webhook deliveries, provider callbacks), kept apart from
orchestrator.api.routes so each part owns its handlers; all of them are listed in the OpenAPI doc."""

from __future__ import annotations

from orchestrator.api.routes import Route


def extra_routes() -> list[Route]:
    routes: list[Route] = []
    for module in ("orchestrator.api.webhooks", "orchestrator.fal.webhook", "orchestrator.api.uploads"):
        try:
            mod = __import__(module, fromlist=["ROUTES"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        routes += mod.ROUTES
    return routes
