"""The real fal_client, through orchestrator.fal.api, against the local fal stub.

Most tests run fal_client in a subprocess whose environment comes from `FalStub.env()`, the
way an RQ worker would run it: fal_client reads its hosts when imported, httpx reads
SSL_CERT_FILE when a client is made.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fal_client.client
import pytest
from aiohttp import web
from fal_stub import FalStub, ModelBehaviour

from orchestrator.fal import api as fal_api
from orchestrator.fal.api import AsyncFalAPI, FalError, image_urls, parse_webhook

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
MODEL = "fal-ai/flux/dev"  # an endpoint with a subpath: status/result URLs drop "/dev"

PRELUDE = """
import json
from orchestrator.fal import api as fal_api
from orchestrator.fal.api import FalError

def err(e):
    return {"error": e.message, "status_code": e.status_code, "retryable": e.retryable,
            "error_type": e.error_type, "cls": type(e).__name__}

def poll(model, rid, limit=50):
    seen = []
    for _ in range(limit):
        st = fal_api.status(model, rid)
        seen.append({"state": st.state, "queue_position": st.queue_position, "logs": st.logs,
                     "error": st.error, "error_type": st.error_type})
        if st.done:
            break
    return seen
"""


async def run_fal(stub: FalStub, body: str, within: float = 60.0) -> Any:
    """Runs PRELUDE + body in a fresh interpreter set up by stub.env(); returns the JSON the
    script prints on its last line."""
    env = {**os.environ, **stub.env()}
    for var in ("FAL_KEY_ID", "FAL_KEY_SECRET", "FAL_FORCE_AUTH_BY_USER"):
        env.pop(var, None)
    env["PYTHONPATH"] = str(REPO)
    code = PRELUDE + textwrap.dedent(body)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=str(REPO),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()[-4000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.fixture
def stub() -> Iterator[FalStub]:
    with FalStub() as s:
        yield s


class Receiver:
    """A webhook receiver on 127.0.0.1 that records each POST."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.url = ""
        self._arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.headers.append(dict(request.headers))
        self._arrived.set()
        return web.json_response({"ok": True})

    async def wait_for(self, n: int) -> None:
        """Waits (10 s at most) until n webhooks arrived."""
        async with asyncio.timeout(10):
            while True:
                self._arrived.clear()
                if len(self.bodies) >= n:
                    return
                await self._arrived.wait()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{job}", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook/job1?token=secret"
    try:
        yield rec
    finally:
        await runner.cleanup()


def poll_driven(**kw: Any) -> ModelBehaviour:
    """Advances only on status polls: deterministic for polling tests."""
    return ModelBehaviour(queue_seconds=None, progress_seconds=None, **kw)


def time_driven(**kw: Any) -> ModelBehaviour:
    """Completes on its own after 0.3 s, with no polls."""
    return ModelBehaviour(queue_seconds=0.1, progress_seconds=0.2, **kw)


async def test_submit_status_with_logs_result(stub: FalStub) -> None:
    stub.set_behaviour(MODEL, poll_driven(queue_polls=2, progress_polls=2))
    out = await run_fal(
        stub,
        f"""
        import httpx, urllib.request
        rid = fal_api.submit({MODEL!r}, {{"prompt": "a red fox", "seed": 7}})
        seen = poll({MODEL!r}, rid)
        result = fal_api.result({MODEL!r}, rid)
        url = fal_api.image_urls(result)[0]
        png = httpx.get(url).content                        # httpx trusts SSL_CERT_FILE
        png2 = urllib.request.urlopen(url, timeout=10).read()  # so does the ssl module
        print(json.dumps({{"rid": rid, "seen": seen, "result": result,
                          "png": png[:8].hex(), "same": png == png2}}))
        """,
    )
    states = [s["state"] for s in out["seen"]]
    assert states == ["IN_QUEUE", "IN_QUEUE", "IN_PROGRESS", "IN_PROGRESS", "COMPLETED"]
    assert [s["queue_position"] for s in out["seen"][:2]] == [1, 0]
    assert out["seen"][2]["logs"] == ["Loading model", "Step 1/2: denoising"]
    assert out["seen"][-1]["logs"][-1] == "Step 2/2: decoding"
    assert out["seen"][-1]["error"] is None
    result = out["result"]
    assert result["seed"] == 7 and result["prompt"] == "a red fox"
    assert result["images"][0]["content_type"] == "image/png"
    assert result["images"][0]["width"] == 64
    assert out["png"] == "89504e470d0a1a0a" and out["same"]

    rid = out["rid"]
    submit = stub.calls_to("submit")[0]
    assert submit.path == f"/{MODEL}" and "fal_webhook" not in submit.query
    assert submit.headers["authorization"] == "Key test-key"
    assert submit.headers["user-agent"].startswith("fal-client/")
    status_calls = stub.calls_to("status", rid)
    assert status_calls[0].path == f"/fal-ai/flux/requests/{rid}/status"
    assert status_calls[0].query == {"logs": "true"}
    assert stub.calls_to("result", rid)[0].path == f"/fal-ai/flux/requests/{rid}"


async def test_upload_through_fal_clients_own_call(stub: FalStub) -> None:
    stub.cdn_upload_failures = 1  # the first upload finds the CDN down and falls back
    out = await run_fal(
        stub,
        """
        import httpx
        first = fal_api.upload(b"GIF89a first", "image/gif", "a.gif")
        second = fal_api.upload(b"GIF89a second", "image/gif", "b.gif")
        print(json.dumps({"first": first, "second": second, "back": httpx.get(second).text}))
        """,
    )
    first, second = stub.stored_file(out["first"]), stub.stored_file(out["second"])
    assert first is not None and first.content == b"GIF89a first" and first.via == "gcs"
    assert second is not None and second.content == b"GIF89a second" and second.via == "cdn"
    assert second.content_type == "image/gif" and second.file_name == "b.gif"
    assert out["back"] == "GIF89a second"
    [token] = stub.calls_to("token")  # one CDN token, reused
    assert token.query == {"storage_type": "fal-cdn-v3"} and token.headers["authorization"] == "Key test-key"
    assert [c.status for c in stub.calls_to("upload")] == [500, 200]
    [initiate] = stub.calls_to("initiate")
    assert initiate.query == {"storage_type": "gcs"} and initiate.headers["authorization"] == "Key test-key"


async def test_plain_fal_client_subscribe(stub: FalStub) -> None:
    """fal_client's own polling loop, without our adapter, accepts every shape."""
    stub.set_behaviour("fal-ai/fast-sdxl", poll_driven(images=2))
    out = await run_fal(
        stub,
        """
        import fal_client
        updates = []
        res = fal_client.subscribe("fal-ai/fast-sdxl", arguments={"prompt": "x"}, with_logs=True,
                                   on_queue_update=lambda s: updates.append(type(s).__name__))
        print(json.dumps({"updates": updates, "n": len(res["images"])}))
        """,
    )
    assert out["updates"][0] == "Queued" and "InProgress" in out["updates"]
    assert out["updates"][-1] == "Completed"
    assert out["n"] == 2


async def test_webhook_is_called_once(stub: FalStub, receiver: Receiver) -> None:
    stub.set_behaviour(MODEL, time_driven())
    out = await run_fal(
        stub,
        f"""
        print(json.dumps(fal_api.submit({MODEL!r}, {{"prompt": "p"}}, webhook_url={receiver.url!r})))
        """,
    )
    await receiver.wait_for(1)
    assert stub.calls_to("submit")[0].query["fal_webhook"] == receiver.url
    body = receiver.bodies[0]
    assert body["request_id"] == out and body["gateway_request_id"] == out
    assert body["status"] == "OK" and body["error"] is None
    assert receiver.headers[0]["Content-Type"].startswith("application/json")
    hook = parse_webhook(body)
    assert hook.request_id == out and hook.ok
    assert hook.payload is not None
    assert image_urls(hook.payload) == [f"{stub.base_url}/files/{out}/0.png"]
    await asyncio.sleep(0.3)
    assert len(receiver.bodies) == 1


async def test_duplicate_webhook(stub: FalStub, receiver: Receiver) -> None:
    stub.set_behaviour(MODEL, time_driven(webhook="duplicate"))
    rid = await run_fal(stub, f"print(json.dumps(fal_api.submit({MODEL!r}, {{}}, {receiver.url!r})))")
    await receiver.wait_for(2)
    assert receiver.bodies[0] == receiver.bodies[1]
    assert receiver.bodies[0]["request_id"] == rid


async def test_lost_webhook_leaves_polling(stub: FalStub, receiver: Receiver) -> None:
    stub.set_behaviour(MODEL, time_driven(webhook="lose"))
    out = await run_fal(
        stub,
        f"""
        import time
        rid = fal_api.submit({MODEL!r}, {{}}, {receiver.url!r})
        time.sleep(0.5)
        st = fal_api.status({MODEL!r}, rid)
        print(json.dumps({{"state": st.state, "urls": fal_api.image_urls(fal_api.result({MODEL!r}, rid))}}))
        """,
    )
    assert out["state"] == "COMPLETED" and len(out["urls"]) == 1
    await asyncio.sleep(0.3)
    assert receiver.bodies == [] and stub.webhook_attempts == []


async def test_model_failure_surfaces_as_fal_error(stub: FalStub, receiver: Receiver) -> None:
    stub.set_behaviour(MODEL, time_driven(fail=True))
    out = await run_fal(
        stub,
        f"""
        import time
        rid = fal_api.submit({MODEL!r}, {{}}, {receiver.url!r})
        time.sleep(0.5)
        st = fal_api.status({MODEL!r}, rid)
        try:
            fal_api.result({MODEL!r}, rid)
            e = None
        except FalError as exc:
            e = err(exc)
        print(json.dumps({{"state": st.state, "failed": st.failed, "status_error": st.error, "e": e}}))
        """,
    )
    assert out["state"] == "COMPLETED" and out["failed"]
    assert out["status_error"] == "field required"
    assert out["e"] == {
        "error": "prompt: field required",
        "status_code": 422,
        "retryable": False,
        "error_type": None,
        "cls": "FalError",
    }
    await receiver.wait_for(1)
    hook = parse_webhook(receiver.bodies[0])
    assert not hook.ok and hook.error is not None
    assert hook.error.status_code == 422
    assert hook.error.message == "Invalid status code: 422: prompt: field required"


async def test_server_error_is_retryable_fal_error(stub: FalStub) -> None:
    stub.set_behaviour(MODEL, poll_driven(http_errors=1, http_error_status=500))
    out = await run_fal(
        stub,
        f"""
        try:
            fal_api.submit({MODEL!r}, {{}})
            first = None
        except FalError as exc:
            first = err(exc)
        rid = fal_api.submit({MODEL!r}, {{}})
        print(json.dumps({{"first": first, "rid": rid}}))
        """,
    )
    assert out["first"]["status_code"] == 500 and out["first"]["retryable"] is True
    assert out["first"]["error_type"] == "runner_server_error"
    assert out["rid"] in stub.requests


async def test_503_on_status_is_retryable(stub: FalStub) -> None:
    # A 503 from fal's own servers (JSON body) is not retried by fal_client: it reaches us.
    stub.set_behaviour(
        MODEL, poll_driven(http_errors=1, http_error_status=503, http_error_endpoints=frozenset({"status"}))
    )
    out = await run_fal(
        stub,
        f"""
        rid = fal_api.submit({MODEL!r}, {{}})
        try:
            fal_api.status({MODEL!r}, rid)
            first = None
        except FalError as exc:
            first = err(exc)
        print(json.dumps({{"first": first, "then": fal_api.status({MODEL!r}, rid).state}}))
        """,
    )
    assert out["first"]["status_code"] == 503 and out["first"]["retryable"] is True
    assert out["then"] == "IN_QUEUE"


async def test_429_then_success(stub: FalStub) -> None:
    # fal_client retries 429 itself (exponential backoff from 0.1 s, up to 10 attempts).
    stub.set_behaviour(MODEL, poll_driven(http_errors=2, http_error_status=429))
    rid = await run_fal(stub, f"print(json.dumps(fal_api.submit({MODEL!r}, {{}})))")
    assert [c.status for c in stub.calls_to("submit")] == [429, 429, 200]
    assert rid in stub.requests


async def test_cancel(stub: FalStub) -> None:
    stub.set_behaviour(MODEL, poll_driven(queue_polls=5))
    out = await run_fal(
        stub,
        f"""
        rid = fal_api.submit({MODEL!r}, {{}})
        before = fal_api.status({MODEL!r}, rid).state
        fal_api.cancel({MODEL!r}, rid)
        after = fal_api.status({MODEL!r}, rid)
        try:
            fal_api.cancel({MODEL!r}, rid)
            again = None
        except FalError as exc:
            again = err(exc)
        try:
            fal_api.result({MODEL!r}, rid)
            res = None
        except FalError as exc:
            res = err(exc)
        print(json.dumps({{"rid": rid, "before": before, "after": [after.state, after.error_type],
                          "again": again, "res": res}}))
        """,
    )
    assert out["before"] == "IN_QUEUE"
    assert out["after"] == ["COMPLETED", "client_cancelled"]
    assert out["again"]["status_code"] == 400 and out["again"]["retryable"] is False
    assert out["res"]["status_code"] == 400
    cancel_calls = stub.calls_to("cancel", out["rid"])
    assert [c.method for c in cancel_calls] == ["PUT", "PUT"]
    assert [c.status for c in cancel_calls] == [202, 400]
    assert cancel_calls[0].path == f"/fal-ai/flux/requests/{out['rid']}/cancel"


async def test_wrong_key_and_unknown_request(stub: FalStub) -> None:
    out = await run_fal(
        stub,
        f"""
        res = {{}}
        try:
            fal_api.status({MODEL!r}, "00000000-0000-0000-0000-000000000000")
        except FalError as exc:
            res["unknown"] = err(exc)
        import os
        os.environ["FAL_KEY"] = "wrong"
        try:
            fal_api.submit({MODEL!r}, {{}})
        except FalError as exc:
            res["wrong_key"] = err(exc)
        print(json.dumps(res))
        """,
    )
    assert out["unknown"]["status_code"] == 404 and not out["unknown"]["retryable"]
    assert out["wrong_key"]["status_code"] == 401 and not out["wrong_key"]["retryable"]


async def test_result_before_completion_does_not_block(stub: FalStub) -> None:
    stub.set_behaviour(MODEL, poll_driven(queue_polls=100))
    out = await run_fal(
        stub,
        f"""
        rid = fal_api.submit({MODEL!r}, {{}})
        try:
            fal_api.result({MODEL!r}, rid)
        except FalError as exc:
            print(json.dumps(err(exc)))
        """,
    )
    assert out["cls"] == "FalNotReady" and out["retryable"] is True


async def test_async_adapter_in_process(stub: FalStub, monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process: the env must be in place before the client's first call, and fal_client's
    # import-time URL global is restored after the test.
    for name, value in stub.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", fal_client.client.QUEUE_URL_FORMAT)
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", fal_client.client.RUN_URL_FORMAT)
    stub.set_behaviour(MODEL, poll_driven())
    api = AsyncFalAPI()
    try:
        rid = await api.submit(MODEL, {"prompt": "async"})
        states = []
        for _ in range(10):
            st = await api.status(MODEL, rid)
            states.append(st.state)
            if st.done:
                break
        result = await api.result(MODEL, rid)
    finally:
        await api.aclose()
    assert states == ["IN_QUEUE", "IN_PROGRESS", "IN_PROGRESS", "COMPLETED"]
    assert result["prompt"] == "async"


def test_parse_webhook_shapes() -> None:
    ok = parse_webhook(
        {
            "request_id": "r1",
            "gateway_request_id": "g1",
            "status": "OK",
            "payload": {"images": [{"url": "https://x/1.png"}, {"url": "https://x/2.png"}]},
        }
    )
    assert (ok.request_id, ok.ok) == ("r1", True)
    assert image_urls(ok.payload) == ["https://x/1.png", "https://x/2.png"]
    rid, good, outcome = parse_webhook(
        {
            "request_id": "r2",
            "status": "ERROR",
            "error": "Invalid status code: 500",
            "payload": {"detail": "boom"},
        }
    )
    assert (rid, good) == ("r2", False)
    assert isinstance(outcome, FalError) and outcome.status_code == 500
    assert outcome.message == "Invalid status code: 500: boom"
    missing = parse_webhook({"request_id": "r3", "status": "OK", "payload": None, "payload_error": "x"})
    assert missing.ok and missing.outcome is None
    for bad in ({}, {"request_id": "r"}, {"request_id": "r", "status": "MAYBE"}):
        with pytest.raises(ValueError):
            parse_webhook(bad)
    assert image_urls({"image": {"url": "https://x/a.png"}}) == ["https://x/a.png"]
    assert image_urls({"text": "no images"}) == [] and image_urls(None) == []


def test_queue_base_url_follows_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_QUEUE_RUN_HOST", raising=False)
    monkeypatch.delenv("FAL_RUN_HOST", raising=False)
    assert fal_api.queue_base_url() == "https://queue.fal.run/"
    monkeypatch.setenv("FAL_RUN_HOST", "example.test:8443")
    assert fal_api.queue_base_url() == "https://queue.example.test:8443/"
    monkeypatch.setenv("FAL_QUEUE_RUN_HOST", "127.0.0.1:9")
    assert fal_api.queue_base_url() == "https://127.0.0.1:9/"
