"""HTTP handlers for /api: parse, authorize, call the core. The table at the bottom feeds both
the router and /api/openapi.json."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace

import orjson
from aiohttp import web

from orchestrator import wire as m
from orchestrator.core import accounts, jobs, uploads
from orchestrator.core.views import iso, job_resource
from orchestrator.delivery.ssrf import check_url
from orchestrator.errors import NotFound, ValidationFailed
from orchestrator.states import FINAL
from orchestrator.web import Route, core, full_access, json_response, query, read_json, validate
from ws_gateway.hub import HUB
from ws_gateway.sse import stream_handler

DEFAULT_TYPE = {"train": "lora", "generate": "image"}
MAX_IDEMPOTENCY_KEY = 255


async def submit(request: web.Request, queue: str) -> web.Response:
    user = await full_access(request)
    c = core(request)
    await c.limiter.hit_submit(user.user_id)
    body = await read_json(request)
    req = validate(m.SubmitRequest, body)
    type_name = req.type or DEFAULT_TYPE[queue]
    task = c.registry.get(type_name)
    if task is None or task.queue != queue:
        known = sorted(t.name for t in c.registry.all() if t.queue == queue)
        raise ValidationFailed(
            f"type {type_name!r} does not run on the {queue} queue (known: {', '.join(known)})",
            details=[{"field": "type", "message": f"must be one of {known}"}],
        )
    inp = validate(task.input_model, req.input, prefix="input").model_dump(mode="json", by_alias=True)
    origins = {o for o in (c.settings.public_url.rstrip("/"), f"{request.scheme}://{request.host}") if o}
    inp = await uploads.own_input_files(c, user.user_id, inp, origins)
    price = task.extra.get("price")
    if price is not None:  # a cost that depends on the input (a fal type's model)
        task = replace(task, cost=price(inp))
    if req.webhook_url:
        await check_url(req.webhook_url, c.settings.webhook_allow_private)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isprintable()):
        raise ValidationFailed(
            "Idempotency-Key must be 1-255 printable characters",
            details=[{"field": "Idempotency-Key", "message": "invalid"}],
        )
    request_hash = hashlib.sha256(queue.encode() + b"\0" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    job, replayed = await c.lifecycle.submit(
        user.user_id,
        task,
        inp,
        webhook_url=req.webhook_url,
        webhook_events=list(req.webhook_events) if req.webhook_events else None,
        idempotency_key=key,
        request_hash=request_hash,
    )
    headers = {"Location": f"/api/jobs/{job.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(job_resource(job), status=202, headers=headers)


async def submit_train(request: web.Request) -> web.Response:
    return await submit(request, "train")


async def submit_generate(request: web.Request) -> web.Response:
    return await submit(request, "generate")


def _etag(job_id: str, seq: int) -> str:
    return f'"{hashlib.sha1(job_id.encode()).hexdigest()[:8]}-{seq}"'


async def get_job(request: web.Request) -> web.Response:
    user = await full_access(request)
    c = core(request)
    q = query(request, m.JobQuery)
    job_id = request.match_info["job_id"]
    job = await jobs.get_job(c.db, job_id, user.user_id)
    if q.wait_seconds and job.status not in FINAL:
        after = q.after_seq if q.after_seq is not None else job.seq
        if job.seq <= after:
            await request.app[HUB].wait_for(job_id, after, q.wait_seconds)
            job = await jobs.get_job(c.db, job_id, user.user_id)
    etag = _etag(job.id, job.seq)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        return web.Response(status=304, headers=headers)
    return json_response(job_resource(job), headers=headers)


async def list_jobs(request: web.Request) -> web.Response:
    user = await full_access(request)
    q = query(request, m.ListQuery)
    rows, nxt = await jobs.list_jobs(
        core(request).db,
        user.user_id,
        status=q.status,
        type_=q.type,
        queue=q.queue,
        limit=q.limit,
        cursor=q.cursor,
    )
    return json_response({"jobs": [job_resource(j) for j in rows], "nextCursor": nxt})


async def cancel_job(request: web.Request) -> web.Response:
    user = await full_access(request)
    job = await core(request).lifecycle.cancel(request.match_info["job_id"], user.user_id, f"user:{user.user_id}")
    return json_response(job_resource(job))


async def job_events(request: web.Request) -> web.Response:
    user = await full_access(request)
    q = query(request, m.EventsQuery)
    c = core(request)
    job = await jobs.get_job(c.db, request.match_info["job_id"], user.user_id)
    return json_response({"events": await jobs.events_after(c.db, job.id, q.after)})


async def list_types(request: web.Request) -> web.Response:
    await full_access(request)
    return json_response({"types": [t.describe() for t in core(request).registry.all()]})


async def me(request: web.Request) -> web.Response:
    user = await full_access(request)
    row = await accounts.get_user(core(request).db, user.user_id)
    if row is None:
        raise NotFound("user not found")
    return json_response({"userId": row.id, "name": row.name, "credits": row.credits})


async def my_ledger(request: web.Request) -> web.Response:
    user = await full_access(request)
    q = query(request, m.LedgerQuery)
    rows, nxt = await accounts.ledger(core(request).db, user.user_id, q.limit, int(q.cursor) if q.cursor else None)
    return json_response({"entries": [accounts.ledger_entry(e) for e in rows], "nextCursor": nxt})


async def create_token(request: web.Request) -> web.Response:
    user = await full_access(request)
    req = validate(m.TokenRequest, await read_json(request))
    c = core(request)
    if req.job_ids:
        await asyncio.gather(*(jobs.get_job(c.db, j, user.user_id) for j in set(req.job_ids)))
    token, exp = c.tokens.issue(user.user_id, req.job_ids, req.ttl_seconds)
    return json_response({"token": token, "expiresAt": iso(exp)}, status=201)


API_ROUTES: list[Route] = [
    Route("POST", "/api/train", submit_train, "Submit a training job", m.JobResource, 202, m.SubmitRequest),
    Route(
        "POST",
        "/api/generate",
        submit_generate,
        "Submit a generation job",
        m.JobResource,
        202,
        m.SubmitRequest,
    ),
    Route("GET", "/api/jobs", list_jobs, "List your jobs, newest first", m.JobList, query=m.ListQuery),
    Route(
        "GET",
        "/api/jobs/{job_id}",
        get_job,
        "Get a job (long-poll with waitSeconds)",
        m.JobResource,
        query=m.JobQuery,
    ),
    Route("GET", "/api/status/{job_id}", get_job, "Get a job (alias)", m.JobResource, query=m.JobQuery),
    Route("DELETE", "/api/jobs/{job_id}", cancel_job, "Cancel a job", m.JobResource),
    Route("POST", "/api/jobs/{job_id}/cancel", cancel_job, "Cancel a job", m.JobResource),
    Route(
        "GET",
        "/api/jobs/{job_id}/events",
        job_events,
        "A job's event history",
        m.EventList,
        query=m.EventsQuery,
    ),
    Route(
        "GET",
        "/api/jobs/{job_id}/stream",
        stream_handler,
        "Follow a job as Server-Sent Events (snapshot, then events; resume with Last-Event-ID or since)",
        None,
        query=m.StreamQuery,
        auth="token",
    ),
    Route("GET", "/api/types", list_types, "Registered task types", m.TypeList, tag="types"),
    Route("GET", "/api/me", me, "The caller's account", m.Me, tag="account"),
    Route(
        "GET",
        "/api/me/ledger",
        my_ledger,
        "The caller's credits ledger",
        m.LedgerList,
        query=m.LedgerQuery,
        tag="account",
    ),
    Route(
        "POST",
        "/api/tokens",
        create_token,
        "Issue a subscribe-only token",
        m.TokenResponse,
        201,
        m.TokenRequest,
        tag="account",
    ),
]
