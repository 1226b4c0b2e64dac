"""A local HTTPS server that speaks fal's queue protocol, as fal_client (1.0.x) uses it.

    stub = FalStub()                  # or: with FalStub() as stub: ...
    stub.start()
    stub.set_behaviour("fal-ai/flux/dev", ModelBehaviour(fail=True))
    env = {**os.environ, **stub.env()}   # for a worker subprocess
    ...
    stub.stop()

What it serves on https://127.0.0.1:<port>/ (see docs/fal-protocol.md):

- `POST /{model}[/{subpath}]?fal_webhook=URL` -> `{"status": "IN_QUEUE", "request_id",
  "gateway_request_id", "response_url", "status_url", "cancel_url", "queue_position", ...}`
- `GET /{owner}/{alias}/requests/{id}/status?logs=true|1` -> IN_QUEUE (queue_position),
  IN_PROGRESS (logs), COMPLETED (logs, metrics, and error/error_type if the model failed)
- `GET /{owner}/{alias}/requests/{id}` -> the result, or the model's error (4xx/5xx)
- `PUT /{owner}/{alias}/requests/{id}/cancel` -> 202 CANCELLATION_REQUESTED /
  400 ALREADY_COMPLETED / 404 NOT_FOUND
- `GET /files/{id}/{n}.png` -> the generated images (no auth, like fal's CDN)
- `GET /.well-known/jwks.json` -> the Ed25519 public key that signs its webhooks (as fal's JWKS)
- fal's storage, as fal_client's `upload` calls it (`ORCH_FAL_REST_URL`/`ORCH_FAL_CDN_URL` point
  fal_api there): `POST /storage/auth/token?storage_type=fal-cdn-v3` (`Authorization: Key`) ->
  `{"token", "token_type", "base_url", "expires_at"}`; `POST /files/upload` (`Authorization:
  <token_type> <token>`, `X-Fal-File-Name`, the bytes) -> `{"access_url"}`; the fallback
  `POST /storage/upload/initiate?storage_type=gcs` -> `{"upload_url", "file_url"}` then
  `PUT upload_url`; `GET /files/u/{id}/{name}` serves a stored file
- `GET /redirect?to=URL` -> 302 to URL (for the result-file guard)

A request advances by status polls (ModelBehaviour.queue_polls, .progress_polls) or by time
(.queue_seconds, .progress_seconds), whichever is further along; when it completes, the stub
POSTs fal's webhook body to the `fal_webhook` URL (once, twice, or never, per behaviour), signed
as fal signs them: `X-Fal-Webhook-{Request-Id,User-Id,Timestamp,Signature}`, the signature being
hex Ed25519 over `{request_id}\n{user_id}\n{timestamp}\n{sha256 hex of the body}`.

The server runs in its own thread and event loop, so sync and async tests can use it alike;
every recorded list is guarded by a lock. TLS: a throwaway CA from `trustme`; `ca_bundle`
holds that CA plus certifi's roots, so pointing SSL_CERT_FILE at it breaks no other TLS.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import math
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import certifi
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from PIL import Image

__all__ = ["Call", "FalStub", "ModelBehaviour", "StoredFile", "StubRequest", "WebhookAttempt"]

WebhookMode = Literal["normal", "lose", "duplicate"]
Endpoint = Literal["submit", "status", "result", "cancel"]
APP_NAMESPACES = ("workflows", "comfy")  # as fal_client.client.APP_NAMESPACES


@dataclass
class ModelBehaviour:
    """How the stub treats requests for one model (the endpoint id as submitted)."""

    # Progress: a request moves on after this many status polls in each stage...
    queue_polls: int = 1
    progress_polls: int = 2
    # ...or after this many seconds in each stage (None: only polls move it on).
    queue_seconds: float | None = 0.5
    progress_seconds: float | None = 1.0
    logs: list[str] = field(default_factory=lambda: ["Loading model", "Step 1/2: denoising", "Step 2/2: decoding"])
    # Result.
    images: int = 1
    width: int = 64
    height: int = 64
    # The model fails: status COMPLETED with `error`, result answers `fail_status` with
    # `{"detail": fail_detail}`, webhook `{"status": "ERROR", "error": "Invalid status code: N"}`.
    fail: bool = False
    fail_status: int = 422
    fail_detail: str | list[dict[str, Any]] = field(
        default_factory=lambda: [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]
    )
    fail_error_type: str | None = None
    # Transient HTTP errors: the first `http_errors` calls to `http_error_endpoints` for this
    # model answer `http_error_status`. fal_client itself retries 408/409/429 (up to 10
    # attempts), and 502/503/504 only when the body looks like nginx's (`http_error_nginx`).
    http_errors: int = 0
    http_error_status: int = 503
    http_error_endpoints: frozenset[str] = frozenset({"submit", "status", "result", "cancel"})
    http_error_nginx: bool = False
    # Webhook: "normal" (once), "lose" (never), "duplicate" (twice).
    webhook: WebhookMode = "normal"
    webhook_delay: float = 0.0
    webhook_attempts: int = 3  # tries per delivery on non-2xx or connection errors
    webhook_retry_delay: float = 0.2
    webhook_on_cancel: bool = False  # also send an ERROR webhook when a request is cancelled
    # A running request only gets a signal to stop (as at fal): with this, the model ignores it
    # and completes normally (the cancel still answers 202), and fal bills it.
    ignore_cancel_in_progress: bool = False


@dataclass
class StubRequest:
    request_id: str
    model: str  # endpoint id as submitted, e.g. "fal-ai/flux/dev"
    app_path: str  # owner/alias (with namespace), e.g. "fal-ai/flux"
    arguments: dict[str, Any]
    webhook_url: str | None
    behaviour: ModelBehaviour
    submitted_at: float  # time.monotonic()
    submitted_wall: float  # time.time()
    polls: int = 0
    completed_at: float | None = None
    cancelled: bool = False
    webhooks_sent: int = 0
    size: tuple[int, int] | None = None  # of the output images, when the input has an image

    @property
    def done(self) -> bool:
        return self.completed_at is not None


@dataclass(frozen=True)
class Call:
    """One HTTP call the stub answered."""

    endpoint: str  # submit, status, result, cancel, file, other
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    status: int
    request_id: str | None
    at: float


@dataclass(frozen=True)
class StoredFile:
    """A file put into the stub's storage."""

    content: bytes
    content_type: str
    file_name: str
    via: str  # "cdn" (fal_v3) or "gcs" (the fallback)


@dataclass(frozen=True)
class WebhookAttempt:
    request_id: str
    url: str
    body: dict[str, Any]
    status: int | None  # None: connection error
    error: str | None
    at: float


class FalStub:
    def __init__(
        self,
        key: str = "test-key",
        default: ModelBehaviour | None = None,
        behaviours: dict[str, ModelBehaviour] | None = None,
    ) -> None:
        self.key = key  # expected in `Authorization: Key <key>`; "" accepts anything
        self.default = default or ModelBehaviour()
        self._behaviours: dict[str, ModelBehaviour] = dict(behaviours or {})
        self._lock = threading.Lock()
        self.requests: dict[str, StubRequest] = {}
        self.calls: list[Call] = []
        self.webhook_attempts: list[WebhookAttempt] = []
        self._error_budget: dict[str, int] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="fal-stub-")
        self._ca = trustme.CA()
        self._server_cert = self._ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = Path(self._tmp.name) / "fal-stub-ca.pem"
        self.ca_bundle = Path(self._tmp.name) / "fal-stub-bundle.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_file))
        self.ca_bundle.write_bytes(self._ca.cert_pem.bytes() + b"\n" + Path(certifi.where()).read_bytes())
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._png_cache: dict[tuple[str, int, int, int], bytes] = {}
        self.stored: dict[str, StoredFile] = {}
        self._cdn_tokens: set[str] = set()
        self._pending_puts: dict[str, tuple[str, str]] = {}
        self.cdn_upload_failures = 0  # the next N `POST /files/upload` answer 500 (fallback test)
        # Webhook signing, as fal does it (ED25519, public key published as JWKS).
        self.sign_webhooks = True
        self.user_id = "stub-user"
        self._signing_key = Ed25519PrivateKey.generate()

    # --- configuration and inspection (thread-safe) -------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"https://{self.host}"

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/.well-known/jwks.json"

    def jwks(self) -> dict[str, Any]:
        raw = self._signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "stub-1", "use": "sig"}]}

    def rotate_key(self) -> None:
        """fal rotates its webhook key: new signatures, a JWKS with only the new key."""
        self._signing_key = Ed25519PrivateKey.generate()

    def sign(self, request_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """fal's webhook signature headers for `body`."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        message = "\n".join([request_id, self.user_id, ts, hashlib.sha256(body).hexdigest()])
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": self.user_id,
            "X-Fal-Webhook-Timestamp": ts,
            "X-Fal-Webhook-Signature": self._signing_key.sign(message.encode()).hex(),
        }

    def env(self) -> dict[str, str]:
        """Variables that make fal_client (and httpx, aiohttp, urllib) in another process
        talk to this stub and trust its certificate."""
        return {
            "FAL_KEY": self.key or "test-key",
            "FAL_RUN_HOST": self.host,
            "FAL_QUEUE_RUN_HOST": self.host,
            "ORCH_FAL_REST_URL": self.base_url,
            "ORCH_FAL_CDN_URL": self.base_url,
            "SSL_CERT_FILE": str(self.ca_bundle),
            "REQUESTS_CA_BUNDLE": str(self.ca_bundle),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSLContext that trusts the stub, for in-process clients."""
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def stored_file(self, url: str) -> StoredFile | None:
        """The file behind a URL that the stub's storage handed out, if any."""
        prefix = f"{self.base_url}/files/u/"
        if not url.startswith(prefix):
            return None
        with self._lock:
            return self.stored.get(url.removeprefix(prefix).split("/", 1)[0])

    def set_behaviour(self, model: str, behaviour: ModelBehaviour) -> None:
        with self._lock:
            self._behaviours[model] = behaviour
            self._error_budget.pop(model, None)

    def behaviour(self, model: str) -> ModelBehaviour:
        with self._lock:
            return self._behaviours.get(model, self.default)

    def calls_to(self, endpoint: str, request_id: str | None = None) -> list[Call]:
        with self._lock:
            return [
                c for c in self.calls if c.endpoint == endpoint and (request_id is None or c.request_id == request_id)
            ]

    def webhooks_for(self, request_id: str) -> list[WebhookAttempt]:
        with self._lock:
            return [w for w in self.webhook_attempts if w.request_id == request_id]

    def request(self, request_id: str) -> StubRequest:
        with self._lock:
            return self.requests[request_id]

    def wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> bool:
        """Polls `predicate` (every 20 ms, at most `within` s) from a sync test."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    async def async_wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> bool:
        """The same, for async tests (never blocks their loop)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if predicate():
                return True
            await asyncio.sleep(0.02)
        return predicate()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> FalStub:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._astart())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="fal-stub", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("fal stub did not start in time")
        if failure:
            self._thread.join(timeout)
            self._thread = None
            raise RuntimeError("fal stub failed to start") from failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self._astop(), loop)
            with contextlib.suppress(Exception):
                fut.result(timeout)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        self._thread = None
        self._loop = None
        self._tmp.cleanup()

    def __enter__(self) -> FalStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _astart(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("GET", "/files/{request_id}/{name}", self._file)
        app.router.add_route("GET", "/.well-known/jwks.json", self._jwks)
        app.router.add_route("POST", "/storage/auth/token", self._cdn_token)
        app.router.add_route("POST", "/files/upload", self._cdn_upload)
        app.router.add_route("POST", "/storage/upload/initiate", self._initiate)
        app.router.add_route("PUT", "/storage/put/{file_id}", self._put)
        app.router.add_route("GET", "/files/u/{file_id}/{name}", self._stored)
        app.router.add_route("GET", "/redirect", self._redirect)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_cert.configure_cert(server_ctx)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        client_ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=15),
            connector=aiohttp.TCPConnector(ssl=client_ctx),
        )

    async def _astop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- protocol ----------------------------------------------------------------------------

    def _record(self, request: web.Request, endpoint: str, status: int, request_id: str | None = None) -> None:
        call = Call(
            endpoint=endpoint,
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            status=status,
            request_id=request_id,
            at=time.time(),
        )
        with self._lock:
            self.calls.append(call)

    def _reply(
        self,
        request: web.Request,
        endpoint: str,
        status: int,
        body: Any,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        self._record(request, endpoint, status, request_id)
        hdrs = dict(headers or {})
        if request_id:
            hdrs.setdefault("x-fal-request-id", request_id)
        return web.json_response(body, status=status, headers=hdrs)

    def _injected_error(
        self, request: web.Request, endpoint: Endpoint, model: str, request_id: str | None
    ) -> web.Response | None:
        b = self.behaviour(model)
        if b.http_errors <= 0 or endpoint not in b.http_error_endpoints:
            return None
        with self._lock:
            used = self._error_budget.get(model, 0)
            if used >= b.http_errors:
                return None
            self._error_budget[model] = used + 1
        code = b.http_error_status
        self._record(request, endpoint, code, request_id)
        if b.http_error_nginx:
            html = f"<html><body><center><h1>{code}</h1></center><hr><center>nginx</center></body></html>"
            return web.Response(status=code, text=html, content_type="text/html")
        detail = "Rate limit exceeded" if code == 429 else f"stub injected HTTP {code}"
        error_type = "rate_limited" if code == 429 else "runner_server_error"
        hdrs = {"x-fal-error-type": error_type}
        if code == 429:
            hdrs["Retry-After"] = "1"
        if request_id:
            hdrs["x-fal-request-id"] = request_id
        return web.json_response({"detail": detail, "error_type": error_type}, status=code, headers=hdrs)

    def _authorized(self, request: web.Request) -> bool:
        return not self.key or request.headers.get("Authorization") == f"Key {self.key}"

    @staticmethod
    def _app_path(endpoint_id: str) -> str:
        parts = endpoint_id.strip("/").split("/")
        n = 3 if parts[0] in APP_NAMESPACES else 2
        return "/".join(parts[:n])

    def _urls(self, req: StubRequest) -> dict[str, str]:
        base = f"{self.base_url}/{req.app_path}/requests/{req.request_id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.strip("/")
        if not self._authorized(request):
            return self._reply(request, "other", 401, {"detail": "Invalid or missing credentials"})
        if "/requests/" not in f"/{path}/":
            if request.method == "POST" and path.count("/") >= 1:
                return await self._submit(request, path)
            return self._reply(request, "other", 405, {"detail": "Method not allowed"})
        app_path, _, rest = path.partition("/requests/")
        request_id, _, action = rest.partition("/")
        endpoint: Endpoint
        if request.method == "GET" and action == "status":
            endpoint = "status"
        elif request.method == "GET" and action == "":
            endpoint = "result"
        elif request.method == "PUT" and action == "cancel":
            endpoint = "cancel"
        else:
            return self._reply(request, "other", 405, {"detail": "Method not allowed"}, request_id)
        with self._lock:
            req = self.requests.get(request_id)
        if req is None or req.app_path != app_path:
            missing: dict[str, Any] = {"detail": "Request not found"}
            if endpoint == "cancel":
                missing = {"status": "NOT_FOUND"}
            return self._reply(request, endpoint, 404, missing, request_id)
        injected = self._injected_error(request, endpoint, req.model, request_id)
        if injected is not None:
            return injected
        if endpoint == "status":
            return self._status(request, req)
        if endpoint == "result":
            return self._result(request, req)
        return self._cancel(request, req)

    async def _submit(self, request: web.Request, model: str) -> web.Response:
        injected = self._injected_error(request, "submit", model, None)
        if injected is not None:
            return injected
        try:
            arguments = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._reply(request, "submit", 422, {"detail": "Body must be JSON"})
        if not isinstance(arguments, dict):
            return self._reply(request, "submit", 422, {"detail": "Body must be a JSON object"})
        image_url = arguments.get("image_url")
        size: tuple[int, int] | None = None
        if image_url is not None:
            source = self.stored_file(str(image_url))
            if source is None:  # fal's validation: the image must be a URL it can fetch
                detail = [{"loc": ["body", "image_url"], "msg": "could not fetch image", "type": "file_download_error"}]
                return self._reply(request, "submit", 422, {"detail": detail})
            with Image.open(io.BytesIO(source.content)) as img:
                factor = int(arguments.get("upscale_factor", 2)) if "upscal" in model else 1
                size = (img.width * factor, img.height * factor)
        b = self.behaviour(model)
        req = StubRequest(
            request_id=str(uuid.uuid4()),
            model=model,
            app_path=self._app_path(model),
            arguments=arguments,
            webhook_url=request.query.get("fal_webhook"),
            behaviour=b,
            submitted_at=time.monotonic(),
            submitted_wall=time.time(),
            size=size,
        )
        with self._lock:
            self.requests[req.request_id] = req
        if b.queue_seconds is not None and b.progress_seconds is not None:
            self._spawn(self._complete_later(req, b.queue_seconds + b.progress_seconds))
        body: dict[str, Any] = {
            "status": "IN_QUEUE",
            "request_id": req.request_id,
            "gateway_request_id": req.request_id,
            **self._urls(req),
            "queue_position": max(b.queue_polls - 1, 0),
            "logs": None,
            "metrics": {},
        }
        return self._reply(request, "submit", 200, body, req.request_id)

    def _stage(self, req: StubRequest) -> tuple[int, int, int]:
        """(stage 0/1/2 = queue/progress/completed, queue_position, logs shown)."""
        b = req.behaviour
        n_logs = len(b.logs)
        # By polls (req.polls counts this poll too).
        k = req.polls
        if k <= b.queue_polls:
            by_polls = (0, max(b.queue_polls - k, 0), 0)
        elif k <= b.queue_polls + b.progress_polls:
            j = k - b.queue_polls
            by_polls = (1, 0, math.ceil(n_logs * j / max(b.progress_polls, 1)))
        else:
            by_polls = (2, 0, n_logs)
        if b.queue_seconds is None or b.progress_seconds is None:
            return by_polls
        t = time.monotonic() - req.submitted_at
        if t < b.queue_seconds:
            left = 1 - t / b.queue_seconds if b.queue_seconds > 0 else 0
            by_time = (0, min(int(left * b.queue_polls), max(b.queue_polls - 1, 0)), 0)
        elif t < b.queue_seconds + b.progress_seconds:
            frac = (t - b.queue_seconds) / b.progress_seconds if b.progress_seconds > 0 else 1
            by_time = (1, 0, min(n_logs, math.ceil(n_logs * frac)))
        else:
            by_time = (2, 0, n_logs)
        return max(by_polls, by_time, key=lambda s: (s[0], s[2], -s[1]))

    @staticmethod
    def _logs(req: StubRequest, shown: int) -> list[dict[str, Any]]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(req.submitted_wall))
        return [
            {"message": msg, "level": "INFO", "source": "user", "timestamp": f"{stamp}.{i:03d}Z"}
            for i, msg in enumerate(req.behaviour.logs[:shown])
        ]

    def _status(self, request: web.Request, req: StubRequest) -> web.Response:
        with_logs = request.query.get("logs", "0").lower() in ("1", "true")
        with self._lock:
            if not req.done:
                req.polls += 1
        if req.done:
            stage = (2, 0, len(req.behaviour.logs))
        else:
            stage = self._stage(req)
            if stage[0] == 2:
                self._complete(req)
        body: dict[str, Any] = {"request_id": req.request_id, **self._urls(req)}
        logs = self._logs(req, stage[2]) if with_logs else None
        if stage[0] == 0:
            body.update(status="IN_QUEUE", queue_position=stage[1], logs=None)
        elif stage[0] == 1:
            body.update(status="IN_PROGRESS", logs=logs)
        else:
            body.update(status="COMPLETED", logs=logs, metrics={"inference_time": 0.42})
            err = self._error_of(req)
            if err is not None:
                body.update(error=err[0], error_type=err[1])
        return self._reply(request, "status", 200, body, req.request_id)

    def _error_of(self, req: StubRequest) -> tuple[str, str | None] | None:
        b = req.behaviour
        if req.cancelled:
            return ("Request was cancelled", "client_cancelled")
        if b.fail:
            detail = b.fail_detail
            msg = detail if isinstance(detail, str) else "; ".join(str(d.get("msg", d)) for d in detail)
            return (msg, b.fail_error_type)
        return None

    def _result_body(self, req: StubRequest) -> dict[str, Any]:
        b = req.behaviour
        width, height = req.size or (b.width, b.height)
        images = []
        for i in range(b.images):
            images.append(
                {
                    "url": f"{self.base_url}/files/{req.request_id}/{i}.png",
                    "content_type": "image/png",
                    "file_name": f"{i}.png",
                    "file_size": len(self._png(req.request_id, i, width, height)),
                    "width": width,
                    "height": height,
                }
            )
        return {
            "images": images,
            "seed": req.arguments.get("seed", 42),
            "prompt": req.arguments.get("prompt", ""),
            "has_nsfw_concepts": [False] * b.images,
            "timings": {"inference": 0.42},
        }

    def _result(self, request: web.Request, req: StubRequest) -> web.Response:
        if not req.done:
            return self._reply(request, "result", 400, {"detail": "Request is still in progress"}, req.request_id)
        if req.cancelled:
            body = {"detail": "Request was cancelled", "error_type": "client_cancelled"}
            return self._reply(request, "result", 400, body, req.request_id)
        b = req.behaviour
        if b.fail:
            fail_body: dict[str, Any] = {"detail": b.fail_detail}
            headers = {}
            if b.fail_error_type:
                fail_body["error_type"] = b.fail_error_type
                headers["x-fal-error-type"] = b.fail_error_type
            return self._reply(request, "result", b.fail_status, fail_body, req.request_id, headers)
        return self._reply(request, "result", 200, self._result_body(req), req.request_id)

    def _cancel(self, request: web.Request, req: StubRequest) -> web.Response:
        running = self._stage(req)[0] == 1
        ignored = running and req.behaviour.ignore_cancel_in_progress
        with self._lock:
            already = req.done
            if not already and not ignored:
                req.cancelled = True
        if already:
            return self._reply(request, "cancel", 400, {"status": "ALREADY_COMPLETED"}, req.request_id)
        if not ignored:
            self._complete(req)
        return self._reply(request, "cancel", 202, {"status": "CANCELLATION_REQUESTED"}, req.request_id)

    # --- completion and webhooks -------------------------------------------------------------

    async def _complete_later(self, req: StubRequest, delay: float) -> None:
        await asyncio.sleep(delay)
        self._complete(req)

    def _complete(self, req: StubRequest) -> None:
        """Marks the request completed (once) and schedules its webhook."""
        with self._lock:
            if req.done:
                return
            req.completed_at = time.monotonic()
        b = req.behaviour
        if req.webhook_url is None or b.webhook == "lose":
            return
        if req.cancelled and not b.webhook_on_cancel:
            return
        times = 2 if b.webhook == "duplicate" else 1
        self._spawn(self._send_webhooks(req, times))

    def webhook_body(self, req: StubRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "request_id": req.request_id,
            "gateway_request_id": req.request_id,
        }
        b = req.behaviour
        if req.cancelled:
            body.update(status="ERROR", error="Request was cancelled", payload={"detail": "Request was cancelled"})
        elif b.fail:
            body.update(
                status="ERROR",
                error=f"Invalid status code: {b.fail_status}",
                payload={"detail": b.fail_detail},
            )
        else:
            body.update(status="OK", payload=self._result_body(req), error=None)
        return body

    async def _send_webhooks(self, req: StubRequest, times: int) -> None:
        b = req.behaviour
        if b.webhook_delay > 0:
            await asyncio.sleep(b.webhook_delay)
        for i in range(times):
            if i:
                await asyncio.sleep(0.05)
            await self._deliver(req)

    async def _deliver(self, req: StubRequest) -> None:
        assert self._session is not None and req.webhook_url is not None
        body = self.webhook_body(req)
        raw = json.dumps(body).encode()
        b = req.behaviour
        for attempt in range(max(b.webhook_attempts, 1)):
            if attempt:
                await asyncio.sleep(b.webhook_retry_delay)
            status: int | None = None
            error: str | None = None
            headers = {"Content-Type": "application/json"}
            if self.sign_webhooks:
                headers.update(self.sign(req.request_id, raw))
            else:
                headers["X-Fal-Webhook-Request-Id"] = req.request_id
            try:
                async with self._session.post(
                    req.webhook_url, data=raw, headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.webhook_attempts.append(
                    WebhookAttempt(req.request_id, req.webhook_url, body, status, error, time.time())
                )
                if status is not None and 200 <= status < 300:
                    req.webhooks_sent += 1
            if status is not None and 200 <= status < 300:
                return

    # --- files -------------------------------------------------------------------------------

    def _png(self, request_id: str, index: int, width: int, height: int) -> bytes:
        key = (request_id, index, width, height)
        cached = self._png_cache.get(key)
        if cached is None:
            seed = uuid.UUID(request_id).int if len(request_id) == 36 else hash(request_id)
            colour = ((seed >> 16) & 255, (seed >> 8) & 255, (seed + index * 97) & 255)
            buf = io.BytesIO()
            Image.new("RGB", (width, height), colour).save(buf, format="PNG")
            cached = self._png_cache[key] = buf.getvalue()
        return cached

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self._record(request, "jwks", 200)
        return web.json_response(self.jwks())

    async def _file(self, request: web.Request) -> web.StreamResponse:
        request_id = request.match_info["request_id"]
        name = request.match_info["name"]
        with self._lock:
            req = self.requests.get(request_id)
        stem = name.removesuffix(".png")
        if req is None or not req.done or not stem.isdigit() or int(stem) >= req.behaviour.images:
            self._record(request, "file", 404, request_id)
            return web.Response(status=404, text="not found")
        b = req.behaviour
        width, height = req.size or (b.width, b.height)
        data = self._png(request_id, int(stem), width, height)
        self._record(request, "file", 200, request_id)
        return web.Response(body=data, content_type="image/png")

    # --- storage (fal_client.upload) ---------------------------------------------------------

    async def _cdn_token(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._reply(request, "token", 401, {"detail": "Invalid or missing credentials"})
        if request.query.get("storage_type") != "fal-cdn-v3":
            return self._reply(request, "token", 422, {"detail": "unknown storage_type"})
        token = uuid.uuid4().hex
        with self._lock:
            self._cdn_tokens.add(token)
        expires = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 3600))
        body = {"token": token, "token_type": "Bearer", "base_url": self.base_url, "expires_at": expires}
        return self._reply(request, "token", 200, body)

    async def _cdn_upload(self, request: web.Request) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        with self._lock:
            known = scheme == "Bearer" and token in self._cdn_tokens
            failing = self.cdn_upload_failures > 0
            if failing:
                self.cdn_upload_failures -= 1
        if not known:
            return self._reply(request, "upload", 401, {"detail": "invalid CDN token"})
        if failing:
            return self._reply(request, "upload", 500, {"detail": "stub injected CDN failure"})
        name = request.headers.get("X-Fal-File-Name") or "upload.bin"
        file_id = self._store(await request.read(), request.headers.get("Content-Type", ""), name, "cdn")
        return self._reply(request, "upload", 200, {"access_url": f"{self.base_url}/files/u/{file_id}/{name}"})

    async def _initiate(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._reply(request, "initiate", 401, {"detail": "Invalid or missing credentials"})
        spec = await request.json()
        name = str(spec.get("file_name") or "upload.bin")
        file_id = uuid.uuid4().hex
        with self._lock:
            self._pending_puts[file_id] = (name, str(spec.get("content_type", "")))
        body = {
            "upload_url": f"{self.base_url}/storage/put/{file_id}",
            "file_url": f"{self.base_url}/files/u/{file_id}/{name}",
        }
        return self._reply(request, "initiate", 200, body)

    async def _put(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        with self._lock:
            pending = self._pending_puts.pop(file_id, None)
        if pending is None:
            return self._reply(request, "put", 404, {"detail": "no such upload"})
        self._store(await request.read(), request.headers.get("Content-Type", pending[1]), pending[0], "gcs", file_id)
        return self._reply(request, "put", 200, {})

    def _store(self, content: bytes, content_type: str, name: str, via: str, file_id: str | None = None) -> str:
        file_id = file_id or uuid.uuid4().hex
        with self._lock:
            self.stored[file_id] = StoredFile(content, content_type, name, via)
        return file_id

    async def _stored(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            found = self.stored.get(request.match_info["file_id"])
        self._record(request, "stored_file", 200 if found else 404)
        if found is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=found.content, content_type=found.content_type or "application/octet-stream")

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        self._record(request, "redirect", 302)
        return web.Response(status=302, headers={"Location": request.query.get("to", "/")})
