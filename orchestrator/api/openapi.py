"""/api/openapi.json, generated from the route table and the pydantic models that validate."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.alias_generators import to_camel
from pydantic.json_schema import models_json_schema

from orchestrator import wire as m
from orchestrator.web import Route

ERRORS = {
    400: "Malformed JSON or parameters (BAD_REQUEST)",
    401: "Missing or invalid credentials",
    402: "Insufficient credits",
    403: "Not allowed with this credential",
    404: "Not found (or another user's)",
    409: "Conflict (JOB_FINISHED, IDEMPOTENCY_KEY_IN_USE, DELIVERY_IN_PROGRESS)",
    413: "Body too large (PAYLOAD_TOO_LARGE, UPLOAD_QUOTA_EXCEEDED)",
    415: "Not an image (UNSUPPORTED_MEDIA_TYPE, uploads)",
    422: "Validation failed (VALIDATION_ERROR, IDEMPOTENCY_KEY_REUSED, WEBHOOK_URL_FORBIDDEN, MODEL_NOT_ALLOWED)",
    429: "Rate limited (see Retry-After)",
    503: "Redis or the database is down (UNAVAILABLE)",
}

UPLOAD_BODY = {
    "required": True,
    "description": "The image itself (with its own Content-Type, e.g. image/png), or one multipart file part",
    "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}


JOB_LINKS = {
    "GetJob": ("get", "/api/jobs/{jobId}"),
    "GetStatus": ("get", "/api/status/{jobId}"),
    "GetEvents": ("get", "/api/jobs/{jobId}/events"),
    "ListDeliveries": ("get", "/api/jobs/{jobId}/deliveries"),
    "CancelJob": ("delete", "/api/jobs/{jobId}"),
    "CancelJobPost": ("post", "/api/jobs/{jobId}/cancel"),
}
"""OpenAPI links from a submit's (and a cancel's, a read's) `jobId` to the job's routes, for
clients and for stateful testing (schemathesis follows them). Not the SSE stream: it stays open
until the job ends."""
LINKED_FROM = [("post", "/api/train"), ("post", "/api/generate"), ("get", "/api/jobs/{jobId}")]


def _add_links(paths: dict[str, dict[str, Any]]) -> None:
    links = {
        name: {
            "operationId": paths[path][method]["operationId"],
            "parameters": {"jobId": "$response.body#/jobId"},
        }
        for name, (method, path) in JOB_LINKS.items()
        if method in paths.get(path, {})
    }
    for method, path in LINKED_FROM:
        op = paths.get(path, {}).get(method)
        if op is not None:
            success = next(code for code in op["responses"] if code.startswith("2"))
            op["responses"][success]["links"] = {name: dict(link) for name, link in links.items()}


def _params(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    out = []
    for name, prop in schema.get("properties", {}).items():
        out.append({"name": name, "in": "query", "required": name in schema.get("required", []), "schema": prop})
    return out


def build(routes: list[Route]) -> dict[str, Any]:
    """The OpenAPI document of `routes` (the app's table, orchestrator.app.ROUTES)."""
    models: set[type[BaseModel]] = {m.ErrorResponse}
    for r in routes:
        for x in (r.body, r.response):
            if x is not None:
                models.add(x)
    ordered = sorted(models, key=lambda x: x.__name__)
    _, defs = models_json_schema(
        [(x, "validation") for x in ordered], by_alias=True, ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        path = re.sub(r"{(\w+)}", lambda m: "{" + to_camel(m.group(1)) + "}", r.path)
        op: dict[str, Any] = {
            "summary": r.summary,
            "tags": [r.tag],
            "operationId": f"{r.method.lower()}_{r.handler.__name__}_{len(paths)}",
        }
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
            for name in re.findall(r"{(\w+)}", path)
        ]
        if r.query is not None:
            params += _params(r.query)
        if r.path in ("/api/train", "/api/generate"):
            params.append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 255},
                }
            )
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{r.body.__name__}"}}},
            }
        if r.path == "/api/uploads":
            op["requestBody"] = UPLOAD_BODY
        responses: dict[str, Any] = {}
        if r.response is None:
            responses[str(r.status)] = {"description": "An event stream", "content": {"text/event-stream": {}}}
        else:
            responses[str(r.status)] = {
                "description": "OK",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{r.response.__name__}"}}},
            }
        if r.path.startswith("/api/jobs/{job_id}") and r.method == "GET" and r.response is m.JobResource:
            responses["304"] = {"description": "Not modified (If-None-Match)"}
        for code, desc in ERRORS.items():
            responses[str(code)] = {
                "description": desc,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
            }
        op["responses"] = responses
        op["security"] = [] if r.auth == "none" else [{"bearer": []}]
        paths.setdefault(path, {})[r.method.lower()] = op
    _add_links(paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "orchestrator",
            "version": "0.1.0",
            "description": "Run long AI jobs; follow them over WebSocket (/ws), SSE, webhooks or polling.",
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
