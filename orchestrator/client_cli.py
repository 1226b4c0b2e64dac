"""`orchestrator submit` and `orchestrator watch`: the Python client with a rich progress bar."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.client import Client, ClientError

FINAL = {"completed", "failed", "cancelled", "timed_out"}


def _client() -> Client:
    url = os.environ.get("ORCH_URL", "http://127.0.0.1:8080")
    key = os.environ.get("ORCH_API_KEY", "")
    if not key:
        print("set ORCH_API_KEY (and ORCH_URL if not http://127.0.0.1:8080)", file=sys.stderr)
        raise SystemExit(2)
    return Client(url, key)


def follow(client: Client, job_id: str) -> int:
    console = Console(stderr=True)
    job: dict[str, Any] = client.get(job_id)
    with Progress(
        TextColumn("[bold]{task.fields[status]:>9}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[msg]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal and os.environ.get("CI") == "true",
    ) as bar:
        task = bar.add_task(
            job_id, total=100, completed=job["progress"], status=job["status"], msg=job["message"] or ""
        )
        for event in client.events(job_id):
            bar.update(
                task,
                completed=event["progress"],
                status=event["status"],
                msg=(event.get("message") or "")[:60],
            )
            if event["type"] == "log":
                console.print(f"[dim]{event['message']}")
        job = client.get(job_id)
    print(json.dumps(job, indent=2))
    return 0 if job["status"] == "completed" else 1


def submit(queue: str, type_: str | None, input_json: str, wait: bool) -> int:
    try:
        inp = json.loads(input_json)
    except json.JSONDecodeError as exc:
        print(f"--input is not JSON: {exc}", file=sys.stderr)
        return 2
    client = _client()
    try:
        job = client.submit(queue, inp, type=type_)
        if not wait:
            print(json.dumps(job, indent=2))
            return 0
        return follow(client, job["jobId"])
    except ClientError as exc:
        print(f"error {exc.status}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


def watch(job_id: str) -> int:
    client = _client()
    try:
        return follow(client, job_id)
    except ClientError as exc:
        print(f"error {exc.status}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
