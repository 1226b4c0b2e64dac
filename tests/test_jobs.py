"""Submit, run and track jobs through real API and worker processes."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import pytest
from PIL import Image
from safetensors.numpy import load
from support import Api, Stack


@pytest.fixture
async def api(stack: Stack, http: aiohttp.ClientSession) -> Api:
    user = await stack.user(credits=500)
    return Api(http, stack.url, user.api_key)


async def test_lora_job_trains_an_adapter_whose_loss_falls(api: Api, http: aiohttp.ClientSession, stack: Stack):
    status, job, headers = await api.call("POST", "/api/train", json={"input": {"name": "fox", "steps": 300}})
    assert status == 202
    assert headers["Location"] == f"/api/jobs/{job['jobId']}"
    assert job["status"] == "queued" and job["type"] == "lora" and job["queue"] == "train"
    assert job["input"] == {"name": "fox", "steps": 300, "rank": 4, "learningRate": 0.01, "seed": 0}
    assert len(job["jobId"]) >= 16

    done = await api.wait(job["jobId"], timeout_s=180)
    assert done["status"] == "completed", done
    assert done["progress"] == 100.0
    assert done["result"]["steps"] == 300
    [artifact] = done["result"]["artifacts"]
    assert artifact["url"].endswith("fox.safetensors")
    async with http.get(stack.url + artifact["url"]) as r:  # no Authorization header
        assert r.status == 200
        blob = await r.read()
    assert len(blob) == artifact["bytes"]
    tensors = load(blob)
    assert tensors["base_model.model.layer.lora_A.weight"].shape == (4, 128)
    assert tensors["base_model.model.layer.lora_B.weight"].shape == (128, 4)

    losses = [e["data"]["loss"] for e in await api.events(job["jobId"]) if e["type"] == "progress"]
    assert len(losses) >= 10
    assert losses[-1] < losses[0] / 5
    assert done["result"]["finalLoss"] == pytest.approx(losses[-1], rel=1e-3, abs=1e-6)


async def test_image_job_renders_a_png_in_steps(api: Api, http: aiohttp.ClientSession, stack: Stack):
    job = await api.submit("generate", {"prompt": "a red fox in snow", "width": 96, "height": 64, "steps": 4})
    done = await api.wait(job["jobId"])
    assert done["status"] == "completed", done
    assert done["result"]["width"] == 96 and done["result"]["height"] == 64
    [artifact] = done["result"]["artifacts"]
    assert artifact["contentType"] == "image/png"
    async with http.get(stack.url + artifact["url"]) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "image/png"
        img = Image.open(io.BytesIO(await r.read()))
    assert img.size == (96, 64)
    steps = [e["data"]["step"] for e in await api.events(job["jobId"]) if e["type"] == "progress"]
    assert steps == [1, 2, 3, 4]


async def test_events_are_numbered_from_one_without_gaps_and_name_their_actor(api: Api):
    job = await api.submit("generate", {"seconds": 0.2, "ticks": 5}, type="sleep")
    done = await api.wait(job["jobId"])
    events = await api.events(job["jobId"])
    assert [e["seq"] for e in events] == list(range(1, done["seq"] + 1))
    assert [e["status"] for e in events if e["type"] == "status"] == ["queued", "running", "completed"]
    assert events[0]["actor"].startswith("user:")
    assert all(e["actor"].startswith("worker:") for e in events[1:])
    assert [e["data"]["tick"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4, 5]
    progress = [e["progress"] for e in events if e["type"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100.0
    assert events[-1]["data"]["result"]["seconds"] == 0.2
    assert all(e["ts"].endswith("Z") for e in events)
    _, after, _ = await api.call("GET", f"/api/jobs/{job['jobId']}/events", params={"after": 3})
    assert [e["seq"] for e in after["events"]] == list(range(4, done["seq"] + 1))


async def test_failed_job_is_refunded_once_and_balance_equals_ledger(api: Api):
    _, me, _ = await api.call("GET", "/api/me")
    job = await api.submit("generate", {"seconds": 0, "ticks": 1, "fail": True}, type="sleep")
    done = await api.wait(job["jobId"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "TASK_ERROR"
    assert done["credits"] == {"charged": 1, "refunded": 1}
    _, me2, _ = await api.call("GET", "/api/me")
    assert me2["credits"] == me["credits"]
    _, ledger, _ = await api.call("GET", "/api/me/ledger", params={"limit": 100})
    assert sum(e["delta"] for e in ledger["entries"]) == me2["credits"]
    mine = [e for e in ledger["entries"] if e["jobId"] == job["jobId"]]
    assert sorted(e["reason"] for e in mine) == ["charge", "refund"]


async def test_another_users_job_is_not_found(api: Api, stack: Stack, http: aiohttp.ClientSession):
    job = await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    other = Api(http, stack.url, (await stack.user()).api_key)
    for method, path in [
        ("GET", f"/api/jobs/{job['jobId']}"),
        ("GET", f"/api/status/{job['jobId']}"),
        ("GET", f"/api/jobs/{job['jobId']}/events"),
        ("DELETE", f"/api/jobs/{job['jobId']}"),
        ("POST", f"/api/jobs/{job['jobId']}/cancel"),
    ]:
        status, body, _ = await other.call(method, path)
        assert status == 404, (method, path, body)
        assert body["error"]["code"] == "NOT_FOUND"
    _, listing, _ = await other.call("GET", "/api/jobs")
    assert listing["jobs"] == []


async def test_list_pages_own_jobs_newest_first(stack: Stack, http: aiohttp.ClientSession):
    api = Api(http, stack.url, (await stack.user()).api_key)
    ids = [(await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep"))["jobId"] for _ in range(5)]
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        status, page, _ = await api.call("GET", "/api/jobs", params=params)
        assert status == 200
        seen += [j["jobId"] for j in page["jobs"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    _, filtered, _ = await api.call("GET", "/api/jobs", params={"type": "image"})
    assert filtered["jobs"] == []
    _, by_queue, _ = await api.call("GET", "/api/jobs", params={"queue": "generate", "limit": 100})
    assert len(by_queue["jobs"]) == 5


async def test_status_alias_and_etag(api: Api):
    job = await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep")
    done = await api.wait(job["jobId"])
    status, alias, headers = await api.call("GET", f"/api/status/{job['jobId']}")
    assert status == 200 and alias["status"] == done["status"] and alias["seq"] == done["seq"]
    status, _, _ = await api.call("GET", f"/api/jobs/{job['jobId']}", headers={"If-None-Match": headers["ETag"]})
    assert status == 304


async def test_types_me_and_ops_endpoints(api: Api, http: aiohttp.ClientSession, stack: Stack):
    _, types, _ = await api.call("GET", "/api/types")
    by_name = {t["type"]: t for t in types["types"]}
    assert by_name["lora"]["queue"] == "train" and by_name["image"]["queue"] == "generate"
    assert by_name["sleep"]["queue"] == "generate"
    assert "learningRate" in by_name["lora"]["inputSchema"]["properties"]
    assert all(t["cost"] >= 0 and t["timeoutSeconds"] > 0 for t in types["types"])
    _, me, _ = await api.call("GET", "/api/me")
    assert set(me) == {"userId", "name", "credits"}
    async with http.get(stack.url + "/healthz") as r:
        assert r.status == 200
    async with http.get(stack.url + "/readyz") as r:
        assert r.status == 200
    async with http.get(stack.url + "/api/openapi.json") as r:
        doc = await r.json()
    assert doc["openapi"].startswith("3.1")
    assert {"/api/train", "/api/generate", "/api/jobs", "/api/jobs/{jobId}", "/api/me"} <= set(doc["paths"])


async def test_forty_concurrent_submits_against_five_credits_create_five_jobs(
    stack: Stack, http: aiohttp.ClientSession
):
    user = await stack.user(credits=5)
    api = Api(http, stack.url, user.api_key)
    results = await asyncio.gather(
        *(
            api.call("POST", "/api/generate", json={"type": "sleep", "input": {"seconds": 0, "ticks": 0}})
            for _ in range(40)
        )
    )
    statuses = sorted(r[0] for r in results)
    assert statuses.count(202) == 5
    assert statuses.count(402) == 35
    assert all(r[1]["error"]["code"] == "INSUFFICIENT_CREDITS" for r in results if r[0] == 402)
    _, me, _ = await api.call("GET", "/api/me")
    assert me["credits"] == 0
    _, listing, _ = await api.call("GET", "/api/jobs", params={"limit": 100})
    assert len(listing["jobs"]) == 5


def test_artifact_paths_accept_every_url_safe_id_and_refuse_traversal(tmp_path):
    from orchestrator.core.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path)
    for job_id in ("-starts-with-dash", "_underscore", "plainId"):
        saved = store.save(job_id, "-adapter.safetensors", b"x", "application/octet-stream")
        _, _, jid, token, name = saved["url"].split("/")
        assert store.path(jid, token, name) is not None
    for bad in (("..", "t" * 22, "x"), ("a", "..", "x"), ("a", "t" * 22, ".."), ("a/b", "t" * 22, "x")):
        assert store.path(*bad) is None
