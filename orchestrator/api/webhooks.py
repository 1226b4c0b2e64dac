"""HTTP handlers for a job's webhook deliveries: the attempt log and redelivery."""

from __future__ import annotations

from aiohttp import web

from orchestrator import wire as m
from orchestrator.core import jobs
from orchestrator.delivery import deliveries
from orchestrator.errors import NotFound
from orchestrator.web import Route, core, full_access, json_response

MAX_WEBHOOK_ID = 64


async def list_deliveries(request: web.Request) -> web.Response:
    user = await full_access(request)
    c = core(request)
    job = await jobs.get_job(c.db, request.match_info["job_id"], user.user_id)
    return json_response({"deliveries": await deliveries.deliveries_log(c.db, job.id)})


async def redeliver(request: web.Request) -> web.Response:
    """Makes one attempt now and answers 200 with it (its status code or error, and the
    delivery's state afterwards); 409 DELIVERY_IN_PROGRESS while another attempt is in flight;
    429 past ORCH_REDELIVER_RATE per user (counted before anything is looked up or sent)."""
    user = await full_access(request)
    c = core(request)
    await c.limiter.hit_redeliver(user.user_id)
    job = await jobs.get_job(c.db, request.match_info["job_id"], user.user_id)
    webhook_id = request.match_info["webhook_id"]
    if len(webhook_id) > MAX_WEBHOOK_ID:
        raise NotFound("delivery not found")
    return json_response(await deliveries.redeliver(c, job.id, webhook_id))


ROUTES: list[Route] = [
    Route(
        "GET",
        "/api/jobs/{job_id}/deliveries",
        list_deliveries,
        "Every webhook delivery attempt of a job, oldest first",
        m.DeliveryList,
        tag="webhooks",
    ),
    Route(
        "POST",
        "/api/jobs/{job_id}/deliveries/{webhook_id}/redeliver",
        redeliver,
        "Send a webhook delivery again now (one attempt; answers with its result)",
        m.Delivery,
        tag="webhooks",
    ),
]
