"""Webhooks out, through real API and worker processes and a real local receiver: Standard
Webhooks signatures, retries on the schedule, Retry-After, 410, the deliveries log, redelivery,
restarts and several API processes; plus the sender's delivery-time SSRF re-check."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from support import Api, Stack, eventually

from orchestrator.delivery import schedule as retry
from orchestrator.delivery import sender, ssrf
from orchestrator.dev.redis_server import free_port

STACK_ENV = {"ORCH_WEBHOOK_RETRY_SCHEDULE": "0.3,0.6,1", "ORCH_WEBHOOK_TIMEOUT": "1"}
QUICK = {"seconds": 0, "ticks": 0}


@dataclass
class Hit:
    name: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1: `plan(name, [...])` scripts the answers for /hook/{name}
    (a status, (status, headers), or ("sleep", seconds) then 200); unscripted requests get 200."""

    port: int = 0
    hits: list[Hit] = field(default_factory=list)
    plans: dict[str, list[Any]] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{name}"

    def plan(self, name: str, steps: list[Any]) -> str:
        self.plans[name] = list(steps)
        return self.url(name)

    def of(self, name: str) -> list[Hit]:
        return [h for h in self.hits if h.name == name]

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.hits.append(Hit(name, dict(request.headers), await request.read(), time.time()))
        steps = self.plans.get(name)
        step = steps.pop(0) if steps else 200
        if isinstance(step, tuple) and step[0] == "sleep":
            await asyncio.sleep(step[1])
            step = 200
        status, headers = step if isinstance(step, tuple) else (step, {})
        return web.Response(status=status, headers=headers, text="ok")


@pytest.fixture
async def receiver():
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{name}", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.port = runner.addresses[0][1]
    try:
        yield rec
    finally:
        await runner.cleanup()


@pytest.fixture
async def user(stack: Stack):
    return await stack.user(credits=1000)


@pytest.fixture
async def api(stack: Stack, http: aiohttp.ClientSession, user) -> Api:
    return Api(http, stack.url, user.api_key)


async def deliveries(api: Api, job_id: str) -> list[dict[str, Any]]:
    status, body, _ = await api.call("GET", f"/api/jobs/{job_id}/deliveries")
    assert status == 200, body
    return list(body["deliveries"])


async def settled(api: Api, job_id: str, count: int = 1, timeout_s: float = 30) -> list[dict[str, Any]]:
    """The deliveries log once `count` deliveries have reached delivered or failed."""

    async def check() -> list[dict[str, Any]] | None:
        log = await deliveries(api, job_id)
        last: dict[str, str] = {}
        for item in log:
            last[item["webhookId"]] = item["state"]
        done = [s for s in last.values() if s in ("delivered", "failed")]
        return log if len(done) >= count and len(done) == len(last) else None

    return list(await eventually(check, timeout_s))


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


async def test_final_event_is_delivered_signed_with_the_job(api: Api, user, receiver: Receiver):
    job = await api.submit("generate", QUICK, type="sleep", webhookUrl=receiver.url("final"))
    done = await api.wait(job["jobId"])
    log = await settled(api, job["jobId"])
    events = await api.events(job["jobId"])
    [hit] = receiver.of("final")
    payload = Webhook(user.webhook_secret).verify(hit.body, hit.headers)
    assert hit.headers["webhook-id"].startswith("msg_")
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["User-Agent"].startswith("orchestrator")
    job_in_body = payload.pop("job")
    assert payload == events[-1] and payload["status"] == "completed"
    assert job_in_body["jobId"] == job["jobId"] and job_in_body["status"] == "completed"
    assert job_in_body["result"] == done["result"]
    assert [(d["webhookId"], d["seq"], d["attempt"], d["statusCode"], d["state"]) for d in log] == [
        (hit.headers["webhook-id"], done["seq"], 1, 200, "delivered")
    ]


async def test_a_tampered_body_fails_verification(api: Api, user, receiver: Receiver):
    job = await api.submit("generate", QUICK, type="sleep", webhookUrl=receiver.url("tamper"))
    await api.wait(job["jobId"])
    await settled(api, job["jobId"])
    [hit] = receiver.of("tamper")
    with pytest.raises(WebhookVerificationError):
        Webhook(user.webhook_secret).verify(hit.body.replace(b"completed", b"failed"), hit.headers)


async def test_requested_running_and_progress_events_arrive_in_seq_order(api: Api, receiver: Receiver):
    job = await api.submit(
        "generate",
        {"seconds": 0.3, "ticks": 3},
        type="sleep",
        webhookUrl=receiver.url("progress"),
        webhookEvents=["running", "progress", "completed"],
    )
    await api.wait(job["jobId"])
    events = await api.events(job["jobId"])
    wanted = [
        e["seq"]
        for e in events
        if e["type"] == "progress" or (e["type"] == "status" and e["status"] in ("running", "completed"))
    ]
    await settled(api, job["jobId"], count=len(wanted))
    got = [h.json for h in receiver.of("progress")]
    assert [b["seq"] for b in got] == wanted
    assert {b["type"] for b in got} == {"status", "progress"}
    assert [("job" in b) for b in got] == [b["status"] == "completed" for b in got]


async def test_failing_receiver_is_retried_with_the_same_webhook_id(api: Api, stack: Stack, receiver: Receiver):
    url = receiver.plan("flaky", [500, 500, 200])
    job = await api.submit("generate", QUICK, type="sleep", webhookUrl=url)
    await api.wait(job["jobId"])
    log = await settled(api, job["jobId"])
    print("deliveries log:", json.dumps({"deliveries": log}, indent=1))
    hits = receiver.of("flaky")
    assert len(hits) == 3 and len({h.headers["webhook-id"] for h in hits}) == 1
    assert [(d["attempt"], d["statusCode"], d["state"]) for d in log] == [
        (1, 500, "pending"),
        (2, 500, "pending"),
        (3, 200, "delivered"),
    ]
    assert log[0]["error"] == "HTTP 500" and log[2]["error"] is None and log[2]["nextAttemptAt"] is None
    for earlier, later in zip(log, hits[1:], strict=False):
        assert later.at >= ts(earlier["nextAttemptAt"])  # never before its scheduled time
    async with api.session.get(stack.url + "/metrics") as r:
        text = await r.text()
    assert 'orchestrator_webhook_deliveries_total{outcome="retry"}' in text
    assert 'orchestrator_event_delivery_lag_seconds_count{channel="webhook"}' in text


async def test_gone_stops_the_retries(api: Api, receiver: Receiver):
    url = receiver.plan("gone", [410, 200])
    job = await api.submit("generate", QUICK, type="sleep", webhookUrl=url)
    await api.wait(job["jobId"])
    log = await settled(api, job["jobId"])
    assert [(d["attempt"], d["statusCode"], d["state"]) for d in log] == [(1, 410, "failed")]
    await asyncio.sleep(2.5)  # longer than the whole retry schedule
    assert len(receiver.of("gone")) == 1


async def test_retry_after_is_honoured(api: Api, receiver: Receiver):
    url = receiver.plan("later", [(503, {"Retry-After": "2"}), 200])
    job = await api.submit("generate", QUICK, type="sleep", webhookUrl=url)
    await api.wait(job["jobId"])
    log = await settled(api, job["jobId"])
    assert [(d["statusCode"], d["state"]) for d in log] == [(503, "pending"), (200, "delivered")]
    assert ts(log[0]["nextAttemptAt"]) - ts(log[0]["at"]) >= 2
    first, second = receiver.of("later")
    assert second.at - first.at >= 2


async def test_timeout_is_retried(api: Api, receiver: Receiver):
    url = receiver.plan("slow", [("sleep", 3), 200])
    job = await api.submit("generate", QUICK, type="sleep", webhookUrl=url)
    await api.wait(job["jobId"])
    log = await settled(api, job["jobId"])
    assert [(d["statusCode"], d["state"]) for d in log] == [(None, "pending"), (200, "delivered")]
    assert "timeout" in log[0]["error"]


async def test_refused_connections_are_retried_and_never_fail_the_job(api: Api):
    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    job = await api.submit(
        "generate", {"seconds": 0.2, "ticks": 2}, type="sleep", webhookUrl=url, webhookEvents=["running", "completed"]
    )
    done = await api.wait(job["jobId"])
    assert done["status"] == "completed" and done["error"] is None
    log = await settled(api, job["jobId"], count=2)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for d in log:
        by_id.setdefault(d["webhookId"], []).append(d)
    assert len(by_id) == 2
    for attempts in by_id.values():
        assert [d["attempt"] for d in attempts] == [1, 2, 3, 4]  # the first try and three retries
        assert all(d["statusCode"] is None and "connection failed" in d["error"] for d in attempts)
        assert [d["state"] for d in attempts] == ["pending"] * 3 + ["failed"]
    assert (await api.job(job["jobId"]))["status"] == "completed"


async def test_redeliver_sends_one_more_attempt(api: Api, receiver: Receiver):
    job = await api.submit("generate", QUICK, type="sleep", webhookUrl=receiver.url("again"))
    await api.wait(job["jobId"])
    [first] = await settled(api, job["jobId"])
    wid = first["webhookId"]
    status, body, _ = await api.call("POST", f"/api/jobs/{job['jobId']}/deliveries/{wid}/redeliver")
    assert status == 200, body
    assert (body["webhookId"], body["attempt"], body["statusCode"], body["state"]) == (wid, 2, 200, "delivered")
    hits = receiver.of("again")
    assert [h.headers["webhook-id"] for h in hits] == [wid, wid]
    assert hits[0].body == hits[1].body
    assert [d["attempt"] for d in await deliveries(api, job["jobId"])] == [1, 2]


async def test_redeliver_of_a_failed_delivery_can_succeed(api: Api, receiver: Receiver):
    url = receiver.plan("revive", [410])
    job = await api.submit("generate", QUICK, type="sleep", webhookUrl=url)
    await api.wait(job["jobId"])
    [gone] = await settled(api, job["jobId"])
    assert gone["state"] == "failed"
    status, body, _ = await api.call("POST", f"/api/jobs/{job['jobId']}/deliveries/{gone['webhookId']}/redeliver")
    assert status == 200 and body["statusCode"] == 200 and body["state"] == "delivered"
    assert [d["state"] for d in await deliveries(api, job["jobId"])] == ["failed", "delivered"]


async def test_deliveries_of_foreign_or_unknown_jobs_are_not_found(
    api: Api, stack: Stack, http: aiohttp.ClientSession, receiver: Receiver
):
    job = await api.submit("generate", QUICK, type="sleep", webhookUrl=receiver.url("mine"))
    await api.wait(job["jobId"])
    [d] = await settled(api, job["jobId"])
    other = Api(http, stack.url, (await stack.user()).api_key)
    calls = [
        (other, "GET", f"/api/jobs/{job['jobId']}/deliveries"),
        (other, "POST", f"/api/jobs/{job['jobId']}/deliveries/{d['webhookId']}/redeliver"),
        (api, "GET", "/api/jobs/no-such-job/deliveries"),
        (api, "POST", f"/api/jobs/{job['jobId']}/deliveries/msg_unknown/redeliver"),
    ]
    for who, method, path in calls:
        status, body, _ = await who.call(method, path)
        assert status == 404 and body["error"]["code"] == "NOT_FOUND", (path, body)
    assert len(receiver.of("mine")) == 1


async def test_a_job_without_webhook_has_an_empty_log(api: Api):
    job = await api.submit("generate", QUICK, type="sleep")
    await api.wait(job["jobId"])
    assert await deliveries(api, job["jobId"]) == []


async def test_pending_retry_survives_an_api_restart(api: Api, stack: Stack, receiver: Receiver):
    url = receiver.plan("restart", [(503, {"Retry-After": "2"})] * 4)
    job = await api.submit("generate", QUICK, type="sleep", webhookUrl=url)
    await api.wait(job["jobId"])
    await eventually(lambda: _first_attempt_recorded(api, job["jobId"]))
    stack.stop_api(0)
    receiver.plans["restart"] = []  # from now on the endpoint answers 200
    restarted_at = time.time()
    stack.start_api(stack.apis[0][1], 0)
    log = await settled(api, job["jobId"])
    assert log[0]["statusCode"] == 503 and log[-1]["statusCode"] == 200 and log[-1]["state"] == "delivered"
    hits = receiver.of("restart")
    assert len({h.headers["webhook-id"] for h in hits}) == 1
    assert hits[-1].at >= restarted_at  # sent by the new process


async def _first_attempt_recorded(api: Api, job_id: str) -> bool:
    log = await deliveries(api, job_id)
    return bool(log) and log[0]["attempt"] == 1


async def test_two_api_processes_send_each_delivery_once(
    api: Api, stack: Stack, http: aiohttp.ClientSession, user, receiver: Receiver
):
    stack.start_api()
    second = Api(http, stack.url_of(len(stack.apis) - 1), user.api_key)
    jobs = []
    for i in range(12):
        via = api if i % 2 else second
        jobs.append(
            await via.submit(
                "generate", QUICK, type="sleep", webhookUrl=receiver.url("pair"), webhookEvents=["running", "completed"]
            )
        )
    for j in jobs:
        await api.wait(j["jobId"])
        log = await settled(api, j["jobId"], count=2)
        assert [d["attempt"] for d in log] == [1, 1]
    hits = receiver.of("pair")
    ids = [h.headers["webhook-id"] for h in hits]
    assert len(ids) == 24 and len(set(ids)) == 24


# ---- the sender's own checks, called directly ---------------------------------------------------


def _claim(url: str) -> retry.Claim:
    body = json.dumps({"jobId": "j", "seq": 1, "type": "status", "status": "completed"})
    return retry.Claim("msg_x", "j", 1, url, body, "whsec_" + "QUJD" * 8, 1, "pending")


async def test_delivery_time_check_refuses_a_private_address(receiver: Receiver):
    claim = _claim(receiver.url("private"))
    async with sender.client_session(allow_private=False) as session:
        result = await sender.send(session, claim, allow_private=False, timeout_s=2)
    assert result.kind == "forbidden" and "non-public" in (result.error or "")
    assert receiver.of("private") == []
    decision = retry.decide(claim, result, [1.0, 2.0], time.time())
    assert (decision.state, decision.next_attempt_at, decision.outcome) == ("failed", None, "forbidden")
    async with sender.client_session(allow_private=True) as session:
        allowed = await sender.send(session, claim, allow_private=True, timeout_s=2)
    assert allowed.kind == "ok" and len(receiver.of("private")) == 1


async def test_resolver_refuses_names_that_resolve_to_private_addresses():
    with pytest.raises(ssrf.ForbiddenUrl):
        await ssrf.PublicOnlyResolver().resolve("localhost", 80)


def test_signature_matches_standard_webhooks():
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    sig = retry.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_retry_delays_follow_the_schedule_and_retry_after():
    schedule = [10.0, 100.0]
    assert 8 <= (retry.retry_delay_s(schedule, 1, None) or 0) <= 12
    assert retry.retry_delay_s(schedule, 1, 50) == 50
    assert retry.retry_delay_s(schedule, 2, 10_000) == 200  # capped at twice the last entry
    assert retry.retry_delay_s(schedule, 3, None) is None
    now = time.time()
    assert retry.retry_after_s("7", now) == 7
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert 28 <= (retry.retry_after_s(http_date, now) or 0) <= 31
    assert retry.retry_after_s("soon", now) is None


@pytest.mark.parametrize("schedule", ["5,abc", "", "0", "-1,5", "inf", "5,99999999"])
def test_a_bad_retry_schedule_stops_the_process_at_start(schedule: str, tmp_path):
    env = {**os.environ, "ORCH_WEBHOOK_RETRY_SCHEDULE": schedule, "ORCH_DATA_DIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r.stderr
    assert "ORCH_WEBHOOK_RETRY_SCHEDULE" in r.stderr and "Traceback" not in r.stderr
