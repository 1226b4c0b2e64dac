"""Python client for the orchestrator API (sync `Client` and async `AsyncClient`).

client = Client("http://127.0.0.1:8080", api_key)
job = client.submit("generate", {"prompt": "a fox"})
for event in client.events(job["jobId"]):   # over /ws, resumes with `since` after a drop
    print(event["seq"], event["progress"])
done = client.wait(job["jobId"], timeout=600)  # long-polling with backoff
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from orchestrator.states import FINAL


class ClientError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        raise ClientError(resp.status_code, err.get("code", "ERROR"), err.get("message", ""), err.get("details"))
    except (ValueError, KeyError, TypeError):
        raise ClientError(resp.status_code, "HTTP_ERROR", resp.text[:200]) from None


def _ws_url(base: str) -> str:
    return base.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/ws"


class AsyncClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers={"Authorization": f"Bearer {api_key}"}
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def submit(
        self,
        queue: str,
        input: dict[str, Any],
        *,
        type: str | None = None,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"input": input}
        if type:
            body["type"] = type
        if webhook_url:
            body["webhookUrl"] = webhook_url
        if webhook_events:
            body["webhookEvents"] = webhook_events
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        resp = await self.http.post(f"/api/{queue}", json=body, headers=headers)
        _raise_for(resp)
        return dict(resp.json())

    async def get(
        self, job_id: str, *, wait_seconds: float | None = None, after_seq: int | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if wait_seconds:
            params["waitSeconds"] = wait_seconds
        if after_seq is not None:
            params["afterSeq"] = after_seq
        resp = await self.http.get(f"/api/jobs/{job_id}", params=params, timeout=(wait_seconds or 0) + 30)
        _raise_for(resp)
        return dict(resp.json())

    async def list(self, **filters: Any) -> dict[str, Any]:
        resp = await self.http.get("/api/jobs", params={k: v for k, v in filters.items() if v is not None})
        _raise_for(resp)
        return dict(resp.json())

    async def cancel(self, job_id: str) -> dict[str, Any]:
        resp = await self.http.delete(f"/api/jobs/{job_id}")
        _raise_for(resp)
        return dict(resp.json())

    async def wait(self, job_id: str, timeout: float = 3600, poll: float = 20) -> dict[str, Any]:
        """Long-poll until the job is final; backs off on errors; TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        job = await self.get(job_id)
        backoff = 0.5
        while job["status"] not in FINAL:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            try:
                job = await self.get(job_id, wait_seconds=max(1, min(poll, left)), after_seq=job["seq"])
                backoff = 0.5
            except (httpx.TransportError, ClientError) as exc:
                if isinstance(exc, ClientError) and exc.status < 500:
                    raise
                await asyncio.sleep(min(backoff, max(0.0, left)))
                backoff = min(backoff * 2, 10)
        return job

    async def events(self, job_id: str, since: int = 0, timeout: float = 3600) -> AsyncIterator[dict[str, Any]]:
        """Every event after `since` over /ws, resuming with `since` after a drop, to the final one."""
        import aiohttp

        deadline = time.monotonic() + timeout
        last = since
        backoff = 0.25
        while time.monotonic() < deadline:
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.ws_connect(
                        _ws_url(self.base_url),
                        headers={"Authorization": f"Bearer {self.api_key}"},
                        heartbeat=30,
                    ) as ws,
                ):
                    await ws.send_str(json.dumps({"type": "subscribe", "jobId": job_id, "since": last}))
                    backoff = 0.25
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            break
                        data = json.loads(msg.data)
                        if data.get("type") == "error":
                            raise ClientError(
                                404 if data.get("code") == "NOT_FOUND" else 400,
                                data.get("code", "ERROR"),
                                data.get("message", ""),
                            )
                        if data.get("type") in ("status", "progress", "log") and data.get("jobId") == job_id:
                            if data["seq"] <= last:
                                continue
                            last = data["seq"]
                            yield data
                            if data["type"] == "status" and data["status"] in FINAL:
                                return
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5)
        raise TimeoutError(f"no final event for {job_id} within {timeout} s")


class Client:
    """The synchronous client: the async one run on a private event loop."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._async = AsyncClient(base_url, api_key, timeout)

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        self._run(self._async.aclose())
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, queue: str, input: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return dict(self._run(self._async.submit(queue, input, **kw)))

    def get(self, job_id: str, **kw: Any) -> dict[str, Any]:
        return dict(self._run(self._async.get(job_id, **kw)))

    def list(self, **filters: Any) -> dict[str, Any]:
        return dict(self._run(self._async.list(**filters)))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._run(self._async.cancel(job_id)))

    def wait(self, job_id: str, timeout: float = 3600, poll: float = 20) -> dict[str, Any]:
        return dict(self._run(self._async.wait(job_id, timeout, poll)))

    def events(self, job_id: str, since: int = 0, timeout: float = 3600) -> Iterator[dict[str, Any]]:
        agen = self._async.events(job_id, since, timeout)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())  # type: ignore[attr-defined]
