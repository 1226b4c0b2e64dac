"""`orchestrator submit` and `orchestrator watch`: the Python client with a rich progress bar.

Following a job shows the bar on stderr and then a short outcome on stdout (status, time taken,
error, artifact URLs); `--json` prints the full job resource instead."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.client import Client, ClientError


def _base_url() -> str:
    return os.environ.get("ORCH_URL", "http://127.0.0.1:8080")


def _client() -> Client:
    url = _base_url()
    key = os.environ.get("ORCH_API_KEY", "")
    if not key:
        print("set ORCH_API_KEY (and ORCH_URL if not http://127.0.0.1:8080)", file=sys.stderr)
        raise SystemExit(2)
    # the HTTP library logs every request at INFO: not for a person watching a bar
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return Client(url, key)


def _seconds(job: dict[str, Any]) -> float | None:
    start, end = job.get("startedAt") or job.get("createdAt"), job.get("finishedAt")
    if not start or not end:
        return None
    parse = datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def outcome(job: dict[str, Any], base_url: str) -> str:
    """A few lines for a person: status, id and time; the error; each artifact's full URL."""
    took = _seconds(job)
    lines = [f"{job['status']}  {job['jobId']}" + (f"  in {took:.1f} s" if took is not None else "")]
    err = job.get("error")
    if err:
        lines.append(f"  error     {err.get('code')}: {err.get('message')}")
    for art in (job.get("result") or {}).get("artifacts") or []:
        url = str(art.get("url", ""))
        lines.append(f"  artifact  {base_url.rstrip('/') + url if url.startswith('/') else url}")
    return "\n".join(lines)


def follow(client: Client, job_id: str, as_json: bool = False) -> int:
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
    print(json.dumps(job, indent=2) if as_json else outcome(job, _base_url()))
    return 0 if job["status"] == "completed" else 1


def submit(queue: str, type_: str | None, input_json: str, wait: bool, as_json: bool = False) -> int:
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
        return follow(client, job["jobId"], as_json)
    except ClientError as exc:
        print(f"error {exc.status}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


def watch(job_id: str, as_json: bool = False) -> int:
    client = _client()
    try:
        return follow(client, job_id, as_json)
    except ClientError as exc:
        print(f"error {exc.status}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
