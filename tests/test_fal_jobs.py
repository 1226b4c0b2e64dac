"""fal.* jobs end to end: real API and worker processes, the real fal_client, the local fal stub.

Two stacks share one stub: `hooked` has ORCH_PUBLIC_URL (fal calls the webhook; the poller
polls every 3 s, so a webhook that arrives wins), `polled` has none (the poller does it all,
every second). The stub signs its webhooks and `hooked` verifies fal's signature.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis
from fal_stub import FalStub, ModelBehaviour
from PIL import Image
from support import Api, Postgres, Stack, eventually

from orchestrator.dev.redis_server import free_port
from orchestrator.errors import Unavailable
from orchestrator.fal import tasks as ft
from orchestrator.fal import webhook as fal_webhook
from orchestrator.fal.webhook import verify_signature

pytestmark = pytest.mark.timeout(180)

SECRET = "test-secret-key"  # Stack's ORCH_SECRET_KEY
FAST = {"queue_seconds": 0.2, "progress_seconds": 0.3}
UPLOAD_LIMIT = 256 * 1024
UPLOAD_QUOTA = 400 * 1024


@pytest.fixture(scope="module")
def stub() -> Iterator[FalStub]:
    with FalStub() as s:
        yield s


ANY_STUB_MODEL = {"models": ["fal-ai/*"]}  # the stub runs whatever it is asked to


def _start(root: Path, database_url: str, stub: FalStub, public: bool, env: dict[str, str]) -> Stack:
    s = Stack(root, database_url, {**stub.env(), "ORCH_FAL_FILES_ALLOW_PRIVATE": "1", **env})
    s.start_redis()
    port = free_port()
    if public:
        s.extra_env["ORCH_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
    try:
        s.start_api(port)
        s.start_worker()
        s.start_worker()
    except BaseException:
        s.stop()
        raise
    return s


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory, database_url: str, stub: FalStub) -> Iterator[Stack]:
    env = {  # fal's webhook signature is checked by default
        "ORCH_FAL_POLL_SCHEDULE": "3",
        "ORCH_FAL_JWKS_URL": stub.jwks_url,
        "ORCH_FAL_JWKS_REFETCH_SECONDS": "0",
        "ORCH_FAL_MODELS": json.dumps({"fal.image": ANY_STUB_MODEL}),
    }
    s = _start(tmp_path_factory.mktemp("hooked"), database_url, stub, True, env)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def polled(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres | None, stub: FalStub) -> Iterator[Stack]:
    if postgres is not None:
        url = postgres.create_db("t_fal_polled")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db-polled') / 'orchestrator.db'}"
    env = {
        "ORCH_FAL_POLL_SCHEDULE": "1",
        "ORCH_FAL_POLL_MAX_ERRORS": "3",
        "ORCH_FAL_MODELS": json.dumps(
            {
                "fal.image": {"models": {"fal-ai/flux/dev": 7, "fal-ai/*": 3}},
                "fal.quick": {"model": "fal-ai/never-done", "timeoutSeconds": 10},
            }
        ),
        "ORCH_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "ORCH_UPLOAD_QUOTA_BYTES": str(UPLOAD_QUOTA),
        "ORCH_SWEEP_INTERVAL": "1",
    }
    s = _start(tmp_path_factory.mktemp("polled"), url, stub, False, env)
    yield s
    s.stop()


@pytest.fixture
async def hapi(hooked: Stack, http: aiohttp.ClientSession) -> AsyncIterator[Api]:
    yield Api(http, hooked.url, (await hooked.user(credits=100)).api_key)


@pytest.fixture
async def papi(polled: Stack, http: aiohttp.ClientSession) -> AsyncIterator[Api]:
    yield Api(http, polled.url, (await polled.user(credits=100)).api_key)


async def submit(api: Api, model: str, type_: str = "fal.image", **arguments: Any) -> str:
    job = await api.submit("generate", {"model": model, "arguments": {"prompt": "a fox", **arguments}}, type=type_)
    assert job["status"] == "queued"
    return str(job["jobId"])


async def request_id(api: Api, job_id: str) -> str:
    async def handed_off() -> str | None:
        for e in await api.events(job_id):
            if e["type"] == "log" and (e["data"] or {}).get("provider") == "fal":
                return str(e["data"]["requestId"])
        return None

    return str(await eventually(handed_off, timeout_s=30))


async def balance(api: Api) -> int:
    _, me, _ = await api.call("GET", "/api/me")
    return int(me["credits"])


async def ledger_reasons(api: Api, job_id: str) -> list[str]:
    _, ledger, _ = await api.call("GET", "/api/me/ledger", params={"limit": 100})
    return sorted(e["reason"] for e in ledger["entries"] if e["jobId"] == job_id)


def statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["status"] for e in events if e["type"] == "status"]


def print_history(title: str, events: list[dict[str, Any]]) -> None:
    print(f"\n--- {title} ---")
    for e in events:
        shown = {k: e[k] for k in ("seq", "type", "status", "progress", "message", "actor", "data", "error", "ts")}
        print(json.dumps(shown))


def webhook_url_of(stub: FalStub, job_id: str, token: str | None = None) -> str:
    return f"/api/providers/fal/webhook/{job_id}?token={token or ft.webhook_token(SECRET, job_id)}"


async def post_webhook(
    api: Api, stub: FalStub, path: str, body: dict[str, Any], rid: str, signed: bool = True
) -> tuple[int, Any]:
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(stub.sign(rid, raw) if signed else {})}
    async with api.session.post(api.base + path, data=raw, headers=headers) as r:
        return r.status, await r.json(content_type=None)


# --- the webhook path ----------------------------------------------------------------------


async def test_fal_image_completes_through_the_webhook(hapi: Api, stub: FalStub, http: aiohttp.ClientSession):
    stub.set_behaviour("fal-ai/hook-ok", ModelBehaviour(**FAST))
    job_id = await submit(hapi, "fal-ai/hook-ok")
    rid = await request_id(hapi, job_id)
    done = await hapi.wait(job_id, timeout_s=30)
    assert done["status"] == "completed" and done["progress"] == 100.0
    result = done["result"]
    assert result["via"] == "webhook" and result["requestId"] == rid and result["model"] == "fal-ai/hook-ok"
    assert stub.calls_to("result", rid) == []  # the webhook carried the output
    [art] = result["artifacts"]
    assert art["url"].startswith(f"/artifacts/{job_id}/") and art["contentType"] == "image/png"
    async with http.get(hapi.base + art["url"]) as r:  # no headers, as in an <img src>
        assert r.status == 200 and (await r.read()).startswith(b"\x89PNG")
        assert art["bytes"] == r.content_length
    hook = stub.request(rid).webhook_url or ""
    assert hook.endswith(webhook_url_of(stub, job_id))
    assert await stub.async_wait_for(lambda: bool(stub.webhooks_for(rid)))  # recorded once answered
    assert [w.status for w in stub.webhooks_for(rid)] == [200]
    events = await hapi.events(job_id)
    assert statuses(events) == ["queued", "running", "completed"]
    assert all(e["actor"] == "provider:fal" for e in events if e["status"] in ("running", "completed"))
    assert done["credits"] == {"charged": 3, "refunded": 0}
    print_history("fal.image through the webhook", events)


async def test_lost_webhook_is_finished_by_the_poller(hapi: Api, stub: FalStub):
    stub.set_behaviour("fal-ai/hook-lost", ModelBehaviour(webhook="lose", **FAST))
    job_id = await submit(hapi, "fal-ai/hook-lost")
    rid = await request_id(hapi, job_id)
    done = await hapi.wait(job_id, timeout_s=40)
    assert done["status"] == "completed"
    assert done["result"]["via"] == "poll"
    assert stub.webhooks_for(rid) == [] and stub.request(rid).webhook_url
    assert statuses(await hapi.events(job_id)) == ["queued", "running", "completed"]


async def test_duplicated_webhook_changes_nothing(hapi: Api, stub: FalStub):
    stub.set_behaviour("fal-ai/hook-dup", ModelBehaviour(webhook="duplicate", **FAST))
    before = await balance(hapi)
    job_id = await submit(hapi, "fal-ai/hook-dup")
    rid = await request_id(hapi, job_id)
    done = await hapi.wait(job_id, timeout_s=30)
    assert done["status"] == "completed"
    assert stub.wait_for(lambda: len(stub.webhooks_for(rid)) == 2, within=10)
    assert [w.status for w in stub.webhooks_for(rid)] == [200, 200]
    # and once more, late, by hand: fal retries deliveries for hours
    late = stub.webhook_body(stub.request(rid))
    status, ack = await post_webhook(hapi, stub, webhook_url_of(stub, job_id), late, rid)
    assert status == 200 and ack["outcome"] == "ignored"
    events = await hapi.events(job_id)
    assert statuses(events) == ["queued", "running", "completed"]
    assert events[-1]["seq"] == done["seq"] == (await hapi.job(job_id))["seq"]
    assert await ledger_reasons(hapi, job_id) == ["charge"]
    assert await balance(hapi) == before - 3


async def test_provider_failure_fails_with_provider_error_and_refunds(hapi: Api, stub: FalStub):
    stub.set_behaviour("fal-ai/hook-fail", ModelBehaviour(fail=True, **FAST))
    before = await balance(hapi)
    job_id = await submit(hapi, "fal-ai/hook-fail")
    done = await hapi.wait(job_id, timeout_s=30)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "PROVIDER_ERROR"
    assert "field required" in done["error"]["message"]
    assert done["credits"] == {"charged": 3, "refunded": 3}
    assert await ledger_reasons(hapi, job_id) == ["charge", "refund"]
    assert await balance(hapi) == before


async def test_5xx_at_submit_is_retried(hapi: Api, stub: FalStub):
    stub.set_behaviour(
        "fal-ai/hook-flaky",
        ModelBehaviour(http_errors=2, http_error_status=503, http_error_endpoints=frozenset({"submit"}), **FAST),
    )
    job_id = await submit(hapi, "fal-ai/hook-flaky")
    done = await hapi.wait(job_id, timeout_s=40)
    assert done["status"] == "completed"
    assert [c.status for c in stub.calls_to("submit") if c.path == "/fal-ai/hook-flaky"] == [503, 503, 200]


async def test_submit_that_keeps_failing_fails_with_provider_error_and_refunds(hapi: Api, stub: FalStub):
    stub.set_behaviour(
        "fal-ai/hook-down",
        ModelBehaviour(http_errors=100, http_error_status=500, http_error_endpoints=frozenset({"submit"})),
    )
    before = await balance(hapi)
    job_id = await submit(hapi, "fal-ai/hook-down")
    done = await hapi.wait(job_id, timeout_s=40)
    assert done["status"] == "failed" and done["error"]["code"] == "PROVIDER_ERROR"
    assert "stub injected HTTP 500" in done["error"]["message"]
    assert len([c for c in stub.calls_to("submit") if c.path == "/fal-ai/hook-down"]) == 3
    assert statuses(await hapi.events(job_id)) == ["queued", "failed"]
    assert await balance(hapi) == before


async def test_webhook_needs_the_jobs_token_and_fals_signature(hapi: Api, stub: FalStub):
    stub.set_behaviour("fal-ai/hook-slow", ModelBehaviour(queue_seconds=0.1, progress_seconds=30))
    job_id = await submit(hapi, "fal-ai/hook-slow")
    rid = await request_id(hapi, job_id)
    body = {"request_id": rid, "gateway_request_id": rid, "status": "OK", "payload": {"images": []}}
    other_token = ft.webhook_token(SECRET, job_id + "x")
    for path in (
        f"/api/providers/fal/webhook/{job_id}",
        webhook_url_of(stub, job_id, token="nope"),
        webhook_url_of(stub, job_id, token=other_token),
    ):
        status, err = await post_webhook(hapi, stub, path, body, rid)
        assert status == 401 and err["error"]["code"] == "UNAUTHORIZED", path
    status, err = await post_webhook(hapi, stub, webhook_url_of(stub, job_id), body, rid, signed=False)
    assert status == 401, err
    status, err = await post_webhook(hapi, stub, webhook_url_of(stub, "no-such-job"), body, rid)
    assert status == 404 and err["error"]["code"] == "NOT_FOUND"
    sleep = await hapi.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    status, err = await post_webhook(hapi, stub, webhook_url_of(stub, sleep["jobId"]), body, rid)
    assert status == 404
    status, err = await post_webhook(hapi, stub, webhook_url_of(stub, job_id), {"status": "OK"}, rid)
    assert status == 400 and err["error"]["code"] == "BAD_REQUEST"
    # a well-formed call about another fal request of ours is acknowledged and ignored
    stray = {**body, "request_id": "another-request"}
    status, ack = await post_webhook(hapi, stub, webhook_url_of(stub, job_id), stray, "another-request")
    assert status == 200 and ack["outcome"] == "ignored"
    job = await hapi.job(job_id)
    assert job["status"] in ("queued", "running") and job["result"] is None
    await hapi.call("DELETE", f"/api/jobs/{job_id}")


async def test_a_rotated_webhook_key_is_fetched_again(hapi: Api, stub: FalStub):
    stub.set_behaviour("fal-ai/hook-rotated", ModelBehaviour(**FAST))
    warm = await submit(hapi, "fal-ai/hook-rotated")  # the API has fal's keys cached after this
    assert (await hapi.wait(warm, timeout_s=30))["result"]["via"] == "webhook"
    fetched = len(stub.calls_to("jwks"))
    stub.rotate_key()
    job_id = await submit(hapi, "fal-ai/hook-rotated")
    rid = await request_id(hapi, job_id)
    done = await hapi.wait(job_id, timeout_s=30)
    assert done["status"] == "completed" and done["result"]["via"] == "webhook"
    assert await stub.async_wait_for(lambda: bool(stub.webhooks_for(rid)))
    assert [w.status for w in stub.webhooks_for(rid)] == [200]
    assert len(stub.calls_to("jwks")) == fetched + 1


# --- the polling path ----------------------------------------------------------------------


async def test_polling_reports_queue_position_running_and_logs(papi: Api, stub: FalStub):
    logs = ["Loading model", "Step 1/2: denoising", "Step 2/2: decoding"]
    behaviour = ModelBehaviour(queue_seconds=None, progress_seconds=None, queue_polls=3, progress_polls=2, logs=logs)
    stub.set_behaviour("fal-ai/flux/schnell", behaviour)
    job = await papi.submit("generate", {"arguments": {"prompt": "a red fox in snow"}}, type="fal.image")
    job_id = job["jobId"]
    assert job["input"]["model"] == "fal-ai/flux/schnell"  # the type's default model
    rid = await request_id(papi, job_id)
    done = await papi.wait(job_id, timeout_s=60)
    assert done["status"] == "completed" and done["result"]["via"] == "poll"
    assert stub.request(rid).webhook_url is None
    assert stub.request(rid).arguments == {"prompt": "a red fox in snow"}
    events = await papi.events(job_id)
    print_history("fal.image by polling (no ORCH_PUBLIC_URL)", events)
    seen = [(e["type"], e["status"], e["message"]) for e in events]
    assert seen == [
        ("status", "queued", "queued"),
        ("log", "queued", "submitted to fal"),
        ("progress", "queued", "queue position 2"),
        ("progress", "queued", "queue position 1"),
        ("progress", "queued", "queue position 0"),
        ("status", "running", "running"),
        ("log", "running", "Loading model"),
        ("log", "running", "Step 1/2: denoising"),
        ("log", "running", "Step 2/2: decoding"),
        ("status", "completed", "completed"),
    ]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["data"]["source"] == "fal" for e in events[6:9])
    assert all(e["data"]["level"] == "INFO" and e["data"]["timestamp"].endswith("Z") for e in events[6:9])
    [art] = done["result"]["artifacts"]
    assert art["contentType"] == "image/png" and art["bytes"] > 0


async def test_cancel_cancels_the_fal_request(papi: Api, stub: FalStub):
    stub.set_behaviour("fal-ai/poll-slow", ModelBehaviour(queue_seconds=0.1, progress_seconds=120))
    before = await balance(papi)
    job_id = await submit(papi, "fal-ai/poll-slow")
    rid = await request_id(papi, job_id)
    await papi.wait(job_id, timeout_s=30, until={"running"})
    status, job, _ = await papi.call("DELETE", f"/api/jobs/{job_id}")
    assert status == 200 and job["status"] == "cancelled"
    assert await asyncio.to_thread(stub.wait_for, lambda: stub.request(rid).cancelled, 20)
    assert await balance(papi) == before
    events = await papi.events(job_id)
    assert events[-1]["status"] == "cancelled" and statuses(events)[-1] == "cancelled"


async def test_5xx_and_429_on_status_are_retried(papi: Api, stub: FalStub):
    for model, code, n in (("fal-ai/poll-503", 503, 2), ("fal-ai/poll-429", 429, 1)):
        flaky = ModelBehaviour(http_errors=n, http_error_status=code, http_error_endpoints=frozenset({"status"}))
        stub.set_behaviour(model, flaky)
        job_id = await submit(papi, model)
        rid = await request_id(papi, job_id)
        done = await papi.wait(job_id, timeout_s=60)
        assert done["status"] == "completed", done
        assert [c.status for c in stub.calls_to("status", rid)][:n] == [code] * n


async def test_fal_that_keeps_failing_ends_provider_error(papi: Api, stub: FalStub):
    down = ModelBehaviour(
        queue_seconds=None,  # never finishes by itself, so the give-up can cancel it
        progress_seconds=None,
        http_errors=1000,
        http_error_status=500,
        http_error_endpoints=frozenset({"status"}),
    )
    stub.set_behaviour("fal-ai/poll-down", down)
    before = await balance(papi)
    job_id = await submit(papi, "fal-ai/poll-down")
    rid = await request_id(papi, job_id)
    done = await papi.wait(job_id, timeout_s=60)
    assert done["status"] == "failed" and done["error"]["code"] == "PROVIDER_ERROR"
    assert "3 times" in done["error"]["message"]
    assert len(stub.calls_to("status", rid)) == 3  # ORCH_FAL_POLL_MAX_ERRORS
    assert stub.request(rid).cancelled
    assert await balance(papi) == before


async def test_a_fal_job_past_its_timeout_times_out(papi: Api, stub: FalStub):
    stub.set_behaviour(
        "fal-ai/never-done", ModelBehaviour(queue_seconds=None, progress_seconds=None, progress_polls=10_000)
    )
    job = await papi.submit("generate", {"arguments": {}}, type="fal.quick")
    rid = await request_id(papi, job["jobId"])
    done = await papi.wait(job["jobId"], timeout_s=60)
    assert done["status"] == "timed_out" and done["error"]["code"] == "TIMEOUT"
    [timed_out] = [e for e in await papi.events(job["jobId"]) if e["status"] == "timed_out"]
    assert timed_out["actor"] == "timeout"  # the sweeper's doing, as for every job
    assert await stub.async_wait_for(lambda: stub.request(rid).cancelled, within=20)  # after the commit


async def test_types_and_input_validation(papi: Api):
    _, types, _ = await papi.call("GET", "/api/types")
    by = {t["type"]: t for t in types["types"]}
    assert by["fal.image"]["cost"] == 3 and by["fal.image"]["queue"] == "generate"
    assert by["fal.lora"]["queue"] == "train" and by["fal.quick"]["timeoutSeconds"] == 10
    props = by["fal.image"]["inputSchema"]["properties"]
    assert props["model"]["default"] == "fal-ai/flux/schnell" and "arguments" in props
    for bad in ({"model": "../admin", "arguments": {}}, {"arguments": []}, {"arguments": {}, "extra": 1}):
        status, err, _ = await papi.call("POST", "/api/generate", json={"type": "fal.image", "input": bad})
        assert status == 422 and err["error"]["code"] == "VALIDATION_ERROR", bad


# --- inputs: uploads and artifacts -----------------------------------------------------------


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30), noise: bool = False) -> bytes:
    if noise:  # random pixels do not compress: the PNG is about 3 bytes a pixel
        img = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        img = Image.new("RGB", (width, height), colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def upload(api: Api, content: bytes, content_type: str = "image/png") -> tuple[int, Any]:
    status, body, _ = await api.call("POST", "/api/uploads", data=content, headers={"Content-Type": content_type})
    return status, body


async def fetch(api: Api, url: str) -> bytes:
    async with api.session.get(api.base + url) as r:  # no headers, as in an <img src>
        assert r.status == 200, url
        return await r.read()


def png_size(content: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(content)) as img:
        return img.size


async def test_upscale_an_upload_then_edit_its_artifact(papi: Api, stub: FalStub):
    stub.set_behaviour("fal-ai/clarity-upscaler", ModelBehaviour(**FAST))
    stub.set_behaviour("fal-ai/flux-pro/kontext", ModelBehaviour(**FAST))
    original = png(40, 30)
    status, up = await upload(papi, original, "application/octet-stream")  # the type comes from the bytes
    assert status == 201 and up["contentType"] == "image/png" and up["bytes"] == len(original)
    assert up["url"].startswith("/artifacts/") and await fetch(papi, up["url"]) == original

    upscale = await papi.submit("generate", {"arguments": {"image_url": up["url"]}}, type="fal.upscale")
    rid = await request_id(papi, upscale["jobId"])
    done = await papi.wait(upscale["jobId"], timeout_s=60)
    assert done["status"] == "completed", done
    sent = stub.request(rid).arguments["image_url"]  # fal got a file in its own storage
    stored = stub.stored_file(sent)
    assert stored is not None and stored.content == original and stored.via == "cdn"
    [art] = done["result"]["artifacts"]
    assert png_size(await fetch(papi, art["url"])) == (80, 60)

    absolute = papi.base + art["url"]  # an artifact URL of one's own, absolute this time
    edit = await papi.submit(
        "generate", {"arguments": {"prompt": "make it blue", "image_url": absolute}}, type="fal.edit"
    )
    assert edit["input"]["arguments"]["image_url"] == art["url"]  # stored in the relative form
    rid = await request_id(papi, edit["jobId"])
    done = await papi.wait(edit["jobId"], timeout_s=60)
    assert done["status"] == "completed", done
    stored = stub.stored_file(stub.request(rid).arguments["image_url"])
    assert stored is not None and stored.content == await fetch(papi, art["url"])
    assert stub.request(rid).arguments["prompt"] == "make it blue"
    assert done["credits"] == {"charged": 4, "refunded": 0}


async def test_uploads_take_images_by_content_within_limits(papi: Api):
    form = aiohttp.FormData()
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    form.add_field("file", jpeg.getvalue(), filename="photo.png", content_type="image/png")
    status, up, _ = await papi.call("POST", "/api/uploads", data=form)
    assert status == 201 and up["contentType"] == "image/jpeg" and up["url"].endswith(".jpg")
    status, err = await upload(papi, b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/png")
    assert status == 415 and err["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    status, err = await upload(papi, png(400, 400, noise=True))
    assert status == 413 and err["error"]["code"] == "PAYLOAD_TOO_LARGE"
    big = png(270, 270, noise=True)
    assert UPLOAD_QUOTA / 2 < len(big) < UPLOAD_LIMIT
    assert (await upload(papi, big))[0] == 201
    status, err = await upload(papi, big)
    assert status == 413 and err["error"]["code"] == "UPLOAD_QUOTA_EXCEEDED"
    async with papi.session.post(papi.base + "/api/uploads", data=png(4, 4)) as r:
        assert r.status == 401


async def test_another_users_upload_or_artifact_is_not_found(papi: Api, polled: Stack, stub: FalStub):
    stub.set_behaviour("fal-ai/own", ModelBehaviour(**FAST))
    other = Api(papi.session, papi.base, (await polled.user(credits=100)).api_key)
    _, theirs = await upload(other, png(10, 10))
    job = await other.submit("generate", {"model": "fal-ai/own", "arguments": {"prompt": "x"}}, type="fal.image")
    [their_art] = (await other.wait(job["jobId"], timeout_s=60))["result"]["artifacts"]
    before = await balance(papi)
    for url in (theirs["url"], their_art["url"], theirs["url"].rsplit("/", 2)[0] + "/nope/upload.png"):
        body = {"type": "fal.upscale", "input": {"arguments": {"image_url": url}}}
        status, err, _ = await papi.call("POST", "/api/generate", json=body)
        assert status == 404 and err["error"]["code"] == "NOT_FOUND", url
    assert await balance(papi) == before


async def test_the_console_upscales_and_edits_a_finished_image(papi: Api, stub: FalStub, browser: Any):
    for model in ("fal-ai/flux/schnell", "fal-ai/clarity-upscaler", "fal-ai/flux-pro/kontext"):
        stub.set_behaviour(model, ModelBehaviour(**FAST))
    job = await papi.submit("generate", {"arguments": {"prompt": "a fox"}}, type="fal.image")
    [art] = (await papi.wait(job["jobId"], timeout_s=60))["result"]["artifacts"]
    page = await browser.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await page.goto(f"{papi.base}/#key={papi.key}")
        await page.wait_for_selector("body[data-ready='1']")
        card = page.locator(f"article.job[data-job-id='{job['jobId']}']")
        await card.locator("button.upscale").click()
        upscale = page.locator("article.job[data-type='fal.upscale']")
        await upscale.locator("img.result-image").wait_for()
        await card.locator("input.edit-prompt").fill("make it blue")
        await card.locator("button.edit").click()
        edit = page.locator("article.job[data-type='fal.edit']")
        await edit.locator("img.result-image").wait_for()
        up_id, edit_id = await upscale.get_attribute("data-job-id"), await edit.get_attribute("data-job-id")
    finally:
        await page.close()
    assert errors == []
    for job_id in (up_id, edit_id):
        done = await papi.job(str(job_id))
        assert done["status"] == "completed" and done["input"]["arguments"]["image_url"] == art["url"]
    assert (await papi.job(str(edit_id)))["input"]["arguments"]["prompt"] == "make it blue"


# --- money -------------------------------------------------------------------------------------


async def test_models_are_allowed_per_type_at_their_cost(papi: Api, stub: FalStub):
    stub.set_behaviour("fal-ai/flux/dev", ModelBehaviour(**FAST))
    before = await balance(papi)
    job = await papi.submit("generate", {"model": "fal-ai/flux/dev", "arguments": {"prompt": "x"}}, type="fal.image")
    assert job["credits"] == {"charged": 7, "refunded": 0}
    for model, type_ in (("other/model", "fal.image"), ("fal-ai/flux/dev", "fal.upscale")):
        body = {"type": type_, "input": {"model": model, "arguments": {"prompt": "x", "image_url": "https://x/y.png"}}}
        status, err, _ = await papi.call("POST", "/api/generate", json=body)
        assert status == 422 and err["error"]["code"] == "MODEL_NOT_ALLOWED", (model, type_)
    assert await balance(papi) == before - 7
    await papi.wait(job["jobId"], timeout_s=60)


async def test_cancelled_request_that_fal_completes_keeps_its_charge(papi: Api, stub: FalStub):
    running = ModelBehaviour(queue_seconds=0.1, progress_seconds=4, ignore_cancel_in_progress=True)
    stub.set_behaviour("fal-ai/finishes-anyway", running)
    before = await balance(papi)
    job_id = await submit(papi, "fal-ai/finishes-anyway")
    rid = await request_id(papi, job_id)
    await papi.wait(job_id, timeout_s=30, until={"running"})
    status, job, _ = await papi.call("DELETE", f"/api/jobs/{job_id}")
    assert status == 200 and job["status"] == "cancelled"

    async def charge_kept() -> bool:
        return (await papi.job(job_id))["credits"]["refunded"] == 0

    await eventually(charge_kept, timeout_s=40)
    assert stub.request(rid).done and not stub.request(rid).cancelled
    job = await papi.job(job_id)
    assert job["status"] == "cancelled" and job["credits"] == {"charged": 3, "refunded": 0}
    last = (await papi.events(job_id))[-1]
    assert last["type"] == "log" and "charge is kept" in last["message"] and last["actor"] == "provider:fal"
    assert await ledger_reasons(papi, job_id) == ["charge", "charge_kept", "refund"]
    assert await balance(papi) == before - 3


async def test_cancelled_request_that_fal_confirms_is_refunded(papi: Api, stub: FalStub):
    stub.set_behaviour("fal-ai/stops", ModelBehaviour(queue_seconds=0.1, progress_seconds=60))
    before = await balance(papi)
    job_id = await submit(papi, "fal-ai/stops")
    rid = await request_id(papi, job_id)
    await papi.wait(job_id, timeout_s=30, until={"running"})
    await papi.call("DELETE", f"/api/jobs/{job_id}")
    assert await asyncio.to_thread(stub.wait_for, lambda: stub.request(rid).cancelled, 20)

    async def status_seen_after_cancel() -> bool:  # the poller asked fal how it ended
        cancel_at = min(c.at for c in stub.calls_to("cancel", rid))
        return any(c.at > cancel_at for c in stub.calls_to("status", rid))

    await eventually(status_seen_after_cancel, timeout_s=20)
    assert (await papi.job(job_id))["credits"] == {"charged": 3, "refunded": 3}
    assert await ledger_reasons(papi, job_id) == ["charge", "refund"]
    assert await balance(papi) == before


# --- failures that end ---------------------------------------------------------------------------


async def test_a_model_error_ends_the_job_whatever_the_http_code(papi: Api, stub: FalStub):
    for code in (500, 503, 422):
        model = f"fal-ai/fails-{code}"
        detail = f"model crashed ({code})"
        stub.set_behaviour(model, ModelBehaviour(fail=True, fail_status=code, fail_detail=detail, **FAST))
        job_id = await submit(papi, model)
        done = await papi.wait(job_id, timeout_s=30)
        assert done["status"] == "failed" and done["error"]["code"] == "PROVIDER_ERROR", done
        assert detail in done["error"]["message"]
        assert done["credits"] == {"charged": 3, "refunded": 3}


async def test_a_result_that_keeps_failing_ends_provider_error(papi: Api, stub: FalStub):
    flaky = ModelBehaviour(http_errors=1000, http_error_status=500, http_error_endpoints=frozenset({"result"}), **FAST)
    stub.set_behaviour("fal-ai/no-result", flaky)
    job_id = await submit(papi, "fal-ai/no-result")
    rid = await request_id(papi, job_id)
    done = await papi.wait(job_id, timeout_s=60)
    assert done["status"] == "failed" and done["error"]["code"] == "PROVIDER_ERROR"
    assert "fetching the result failed 3 times" in done["error"]["message"]
    assert len(stub.calls_to("result", rid)) == 3


async def test_poll_schedule_lost_by_redis_is_rebuilt_from_sql(papi: Api, polled: Stack, stub: FalStub):
    stub.set_behaviour("fal-ai/forgotten", ModelBehaviour(queue_seconds=0.1, progress_seconds=3))
    job_id = await submit(papi, "fal-ai/forgotten")
    await request_id(papi, job_id)
    assert polled.redis is not None
    r = redis.Redis.from_url(polled.redis.url)
    try:
        r.zrem(ft.DUE, job_id)
        r.delete(ft.state_key(job_id))
        done = await papi.wait(job_id, timeout_s=60)
    finally:
        r.close()
    assert done["status"] == "completed" and done["result"]["via"] == "poll"


# --- pieces ----------------------------------------------------------------------------------


def test_signature_check_binds_body_request_and_time(stub: FalStub):
    raw = b'{"status": "OK"}'
    headers = stub.sign("req-1", raw)
    keys = [bytes(32)] + [base64.urlsafe_b64decode(k["x"] + "=" * (-len(k["x"]) % 4)) for k in stub.jwks()["keys"]]
    now = float(headers["X-Fal-Webhook-Timestamp"])
    assert verify_signature(headers, raw, keys, now)
    assert not verify_signature(headers, raw + b" ", keys, now)
    assert not verify_signature({**headers, "X-Fal-Webhook-Request-Id": "req-2"}, raw, keys, now)
    assert not verify_signature(headers, raw, keys, now + 301)
    assert not verify_signature(headers, raw, keys[:1], now)
    assert not verify_signature({}, raw, keys, now)


def test_output_files_finds_every_fal_file():
    out = {
        "images": [{"url": "https://x/a.png", "content_type": "image/png"}, {"url": "https://x/b.jpg"}],
        "diffusers_lora_file": {"url": "https://x/l.safetensors", "file_name": "l.safetensors", "file_size": 9},
        "seed": 1,
        "nested": {"deep": [{"url": "ftp://nope"}]},
    }
    files = ft.output_files(out)
    assert [f.url for f in files] == ["https://x/a.png", "https://x/b.jpg", "https://x/l.safetensors"]
    assert files[2].size == 9 and files[0].content_type == "image/png"


def test_models_setting_merges_over_the_defaults(monkeypatch: pytest.MonkeyPatch):
    models = {"fal.image": "fal-ai/flux/dev", "fal.upscale": None, "fal.video": {"model": "fal-ai/v", "cost": 9}}
    monkeypatch.setenv("ORCH_FAL_MODELS", json.dumps(models))
    types = ft.FalSettings().types()
    assert types["fal.image"].model == "fal-ai/flux/dev" and types["fal.image"].cost == 3
    assert "fal.upscale" not in types and types["fal.video"].cost == 9
    assert ft.FalSettings().poll_delay_s(1) == 1 and ft.FalSettings().poll_delay_s(99) == 30


async def test_a_failed_key_fetch_lets_no_webhook_through(stub: FalStub):
    raw = b'{"status": "OK"}'
    headers = stub.sign("req-1", raw)
    unreachable = f"https://127.0.0.1:{free_port()}/.well-known/jwks.json"
    fal_webhook._jwks_cache[unreachable] = (0.0, [bytes(32)])  # stale, and not fal's key
    assert not await fal_webhook.signature_ok(headers, raw, unreachable, 0)
    fal_webhook._jwks_cache.pop(unreachable)
    with pytest.raises(Unavailable):  # nothing cached, nothing fetched: 503, fal retries later
        await fal_webhook.signature_ok(headers, raw, unreachable, 0)


async def test_result_files_come_only_from_public_https_urls(stub: FalStub):
    for url in ("http://example.com/a.png", "ftp://example.com/a.png", "https://10.0.0.7/a.png", "https://[::1]/a"):
        with pytest.raises(ValueError):
            await ft.check_file_url(url, allow_private=False)
    async with httpx.AsyncClient(verify=stub.client_ssl_context()) as client:
        with pytest.raises(ValueError):  # the stand-in itself is on a private address
            await ft.download(client, stub.jwks_url, 1 << 20, allow_private=False)
        content, _ = await ft.download(client, stub.jwks_url, 1 << 20, allow_private=True)
        assert b"keys" in content
        for hop in ("file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO"):  # checked at each redirect
            with pytest.raises(ValueError):
                await ft.download(client, f"{stub.base_url}/redirect?to={hop}", 1 << 20, allow_private=True)
