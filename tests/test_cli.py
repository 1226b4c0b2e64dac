"""The console script: users create/credit, submit --wait, watch."""

from __future__ import annotations

import json
import subprocess
import sys

import aiohttp
from support import Api, Stack


def cli(stack: Stack, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=stack.env | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


async def test_users_create_json_and_credit(stack: Stack, http: aiohttp.ClientSession):
    out = cli(stack, "users", "create", "carol", "--credits", "7", "--json")
    assert out.returncode == 0, out.stderr
    user = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(user) == {"userId", "name", "apiKey", "webhookSecret", "credits"}
    assert user["name"] == "carol" and user["credits"] == 7
    assert user["webhookSecret"].startswith("whsec_")
    again = cli(stack, "users", "create", "carol")
    assert again.returncode != 0
    credit = cli(stack, "users", "credit", "carol", "5")
    assert credit.returncode == 0, credit.stderr
    api = Api(http, stack.url, user["apiKey"])
    _, me, _ = await api.call("GET", "/api/me")
    assert me["credits"] == 12
    _, ledger, _ = await api.call("GET", "/api/me/ledger")
    assert [(e["reason"], e["delta"], e["balanceAfter"]) for e in ledger["entries"]] == [
        ("topup", 5, 12),
        ("topup", 7, 7),
    ]


async def test_submit_wait_exits_zero_on_completed_and_one_on_failure(stack: Stack):
    user = await stack.user(credits=20)
    env = {"ORCH_URL": stack.url, "ORCH_API_KEY": user.api_key}
    ok = cli(
        stack,
        "submit",
        "generate",
        "--type",
        "sleep",
        "--input",
        '{"seconds": 0.2, "ticks": 3}',
        "--wait",
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    status, job_id = ok.stdout.split()[:2]
    assert status == "completed" and job_id
    assert "HTTP Request" not in ok.stderr  # no INFO line per request above the bar
    job = {"jobId": job_id}
    bad = cli(
        stack,
        "submit",
        "generate",
        "--type",
        "sleep",
        "--input",
        '{"fail": true, "seconds": 0}',
        "--wait",
        "--json",
        env=env,
    )
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["code"] == "TASK_ERROR"
    watched = cli(stack, "watch", job["jobId"], "--json", env=env)
    assert watched.returncode == 0 and json.loads(watched.stdout)["jobId"] == job["jobId"]
    nowait = cli(stack, "submit", "train", "--input", '{"name": "cli", "steps": 5}', env=env)
    assert nowait.returncode == 0 and json.loads(nowait.stdout)["status"] == "queued"


async def test_submit_wait_ends_with_a_short_outcome_naming_the_artifact_urls(stack: Stack):
    user = await stack.user(credits=20)
    env = {"ORCH_URL": stack.url, "ORCH_API_KEY": user.api_key}
    out = cli(
        stack,
        "submit",
        "generate",
        "--input",
        '{"prompt": "a fox", "width": 64, "height": 64, "steps": 1}',
        "--wait",
        env=env,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("completed  ") and lines[0].endswith(" s")
    urls = [line.split()[-1] for line in lines if line.strip().startswith("artifact")]
    assert urls and all(u.startswith(f"{stack.url}/artifacts/") for u in urls)
    assert len(lines) < 10
    watched = cli(stack, "watch", lines[0].split()[1], env=env)
    assert watched.returncode == 0 and watched.stdout == out.stdout
