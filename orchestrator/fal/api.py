"""A small typed adapter over `fal_client`'s queue API (see docs/fal-protocol.md).

It knows nothing of jobs or their lifecycle: it submits a request, reads its status, fetches its
result, cancels it, and parses fal's webhook body. Every failure comes out as `FalError`, whose
`retryable` is true for 5xx, 429, 408 and network errors.

Two clients with the same methods: `FalAPI` (blocking, for RQ workers) and `AsyncFalAPI` (for an
event loop; make one per loop and `aclose()` it). The module functions `submit`, `status`,
`result` and `cancel` use a shared `FalAPI`.

Configuration comes from the environment, as fal_client reads it: `FAL_KEY` (sent as
`Authorization: Key <FAL_KEY>`), `FAL_QUEUE_RUN_HOST` (default `queue.$FAL_RUN_HOST`) and
`FAL_RUN_HOST` (default `fal.run`). fal_client freezes the two host variables when it is first
imported; this module re-reads them on every call, so setting them later (as tests do) works.
fal_client has no variables for its storage hosts (`REST_URL`, `CDN_URL`, used by `upload`);
`ORCH_FAL_REST_URL` and `ORCH_FAL_CDN_URL` override them here (the local stand-in sets them).
TLS is verified by httpx, which honours `SSL_CERT_FILE` when a client is created.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

import fal_client
import fal_client.client as _fal_client_module
import httpx
from fal_client.auth import MissingCredentialsError

__all__ = [
    "AsyncFalAPI",
    "FalAPI",
    "FalError",
    "FalLog",
    "FalNotReady",
    "FalState",
    "FalStatus",
    "FalWebhook",
    "cancel",
    "image_urls",
    "parse_webhook",
    "queue_base_url",
    "result",
    "status",
    "submit",
    "upload",
]

FalState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]

RETRYABLE_STATUS_CODES = frozenset({408, 429})
DEFAULT_TIMEOUT = 30.0

_T = TypeVar("_T")


class FalError(Exception):
    """A failed call to fal, or a fal request that ended in error.

    `status_code` is the HTTP status fal answered (None for network errors and for errors
    reported inside a 200 answer); `retryable` says whether trying again may succeed.
    """

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        retryable: bool = False,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retryable = retryable
        self.error_type = error_type

    def __repr__(self) -> str:
        return (
            f"FalError({self.message!r}, status_code={self.status_code!r}, "
            f"retryable={self.retryable!r}, error_type={self.error_type!r})"
        )


class FalNotReady(FalError):
    """`result()` was asked for a request that has not completed yet (retryable)."""


@dataclass(frozen=True)
class FalLog:
    """One line of a request's log, with fal's own level and timestamp (strings, as fal sends)."""

    message: str
    level: str | None = None
    timestamp: str | None = None


@dataclass(frozen=True)
class FalStatus:
    """One answer of fal's status endpoint.

    `logs` holds every log message so far (fal resends the whole list on each poll, so a
    poller keeps a count of what it has already reported). On COMPLETED, `error` is set when
    the request failed; `result()` then raises the matching FalError.
    """

    state: FalState
    queue_position: int | None = None
    logs: list[str] = field(default_factory=list)
    log_entries: list[FalLog] = field(default_factory=list)
    """The same lines as `logs`, with fal's level and timestamp."""
    error: str | None = None
    error_type: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state == "COMPLETED"

    @property
    def failed(self) -> bool:
        return self.state == "COMPLETED" and self.error is not None


class FalWebhook(NamedTuple):
    """fal's webhook body, parsed: `(request_id, ok, outcome)`.

    `outcome` is the model's result dict when ok, a `FalError` when not. It is None when fal
    reported success but could not include the result (`payload: null` with `payload_error`):
    fetch it with `result()` then.
    """

    request_id: str
    ok: bool
    outcome: dict[str, Any] | FalError | None

    @property
    def payload(self) -> dict[str, Any] | None:
        return self.outcome if isinstance(self.outcome, dict) else None

    @property
    def error(self) -> FalError | None:
        return self.outcome if isinstance(self.outcome, FalError) else None


# --- hosts ----------------------------------------------------------------------------------


def queue_base_url() -> str:
    """`https://<queue host>/` from the environment, exactly as fal_client derives it."""
    run_host = os.environ.get("FAL_RUN_HOST", "fal.run")
    queue_host = os.environ.get("FAL_QUEUE_RUN_HOST", f"queue.{run_host}")
    return f"https://{queue_host}/"


_REST_URL = _fal_client_module.REST_URL
_CDN_URL = _fal_client_module.CDN_URL


def _sync_hosts_from_env() -> None:
    # fal_client computes QUEUE_URL_FORMAT / RUN_URL_FORMAT once, at import time, and looks the
    # module globals up on every call. Refresh them so the environment at call time wins. In
    # production (variables unset, or set before import) this is a no-op.
    base = queue_base_url()
    if _fal_client_module.QUEUE_URL_FORMAT != base:
        _fal_client_module.QUEUE_URL_FORMAT = base
    run = f"https://{os.environ.get('FAL_RUN_HOST', 'fal.run')}/"
    if _fal_client_module.RUN_URL_FORMAT != run:
        _fal_client_module.RUN_URL_FORMAT = run
    _fal_client_module.REST_URL = os.environ.get("ORCH_FAL_REST_URL") or _REST_URL
    _fal_client_module.CDN_URL = os.environ.get("ORCH_FAL_CDN_URL") or _CDN_URL


# --- error mapping --------------------------------------------------------------------------


def _detail_message(detail: Any) -> str:
    """fal's `detail` is either a string or a list of `{loc, msg, type}` objects."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, Mapping):
                loc = item.get("loc")
                where = ".".join(str(p) for p in loc[1:]) if isinstance(loc, list) and len(loc) > 1 else ""
                msg = str(item.get("msg", item))
                parts.append(f"{where}: {msg}" if where else msg)
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, Mapping) and "msg" in detail:
        return str(detail["msg"])
    return str(detail)


def _is_retryable(status_code: int) -> bool:
    return status_code >= 500 or status_code in RETRYABLE_STATUS_CODES


def _from_exception(exc: BaseException) -> FalError:
    if isinstance(exc, FalError):
        return exc
    if isinstance(exc, fal_client.FalClientHTTPError):
        # fal_client puts the body's `detail` (a string, or a list for model errors) in
        # `message`, or the raw text when the body has none.
        message = _detail_message(exc.message) if exc.message else ""
        return FalError(
            message or f"fal answered HTTP {exc.status_code}",
            status_code=exc.status_code,
            retryable=_is_retryable(exc.status_code),
            error_type=exc.error_type,
        )
    if isinstance(exc, httpx.TimeoutException | fal_client.FalClientTimeoutError):
        return FalError(f"fal request timed out: {exc}", retryable=True, error_type="timeout")
    if isinstance(exc, httpx.TransportError):
        return FalError(f"cannot reach fal: {type(exc).__name__}: {exc}", retryable=True, error_type="network")
    if isinstance(exc, MissingCredentialsError):
        return FalError(str(exc), retryable=False, error_type="missing_credentials")
    # Bad model id (ValueError from fal_client), malformed answers (KeyError, JSON errors).
    return FalError(f"{type(exc).__name__}: {exc}", retryable=False, error_type="client_error")


def _call(fn: Callable[[], _T]) -> _T:
    _sync_hosts_from_env()
    try:
        return fn()
    except Exception as exc:
        raise _from_exception(exc) from exc


async def _acall(fn: Callable[[], Awaitable[_T]]) -> _T:
    _sync_hosts_from_env()
    try:
        return await fn()
    except Exception as exc:
        raise _from_exception(exc) from exc


def _to_status(st: fal_client.Status) -> FalStatus:
    if isinstance(st, fal_client.Queued):
        return FalStatus(state="IN_QUEUE", queue_position=st.position)
    if isinstance(st, fal_client.InProgress):
        entries = _log_entries(st.logs)
        return FalStatus(state="IN_PROGRESS", logs=[e.message for e in entries], log_entries=entries)
    if isinstance(st, fal_client.Completed):
        entries = _log_entries(st.logs)
        return FalStatus(
            state="COMPLETED",
            logs=[e.message for e in entries],
            log_entries=entries,
            error=st.error,
            error_type=st.error_type,
            metrics=dict(st.metrics or {}),
        )
    raise FalError(f"unknown fal status {st!r}")


def _log_entries(logs: list[dict[str, Any]] | None) -> list[FalLog]:
    def text(value: Any) -> str | None:
        return str(value) if value is not None else None

    return [
        FalLog(str(e.get("message", "")), text(e.get("level")), text(e.get("timestamp")))
        for e in logs or []
        if isinstance(e, Mapping)
    ]


def _not_ready(request_id: str, st: FalStatus) -> FalNotReady:
    return FalNotReady(f"fal request {request_id} is {st.state}, not COMPLETED", retryable=True, error_type="not_ready")


# --- clients --------------------------------------------------------------------------------


class FalAPI:
    """Blocking client. Thread-safe as fal_client.SyncClient is (one httpx.Client inside)."""

    def __init__(self, key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        # key None: fal_client reads FAL_KEY (or FAL_KEY_ID/FAL_KEY_SECRET) on first use.
        self._client = fal_client.SyncClient(key=key, default_timeout=timeout)

    def submit(self, model: str, arguments: dict[str, Any], webhook_url: str | None = None) -> str:
        """Queues a request; returns fal's request_id. `webhook_url` becomes `?fal_webhook=`."""
        handle = _call(lambda: self._client.submit(model, arguments, webhook_url=webhook_url))
        return handle.request_id

    def status(self, model: str, request_id: str) -> FalStatus:
        """One status poll, with logs (`GET .../requests/{id}/status?logs=true`)."""
        return _to_status(_call(lambda: self._client.status(model, request_id, with_logs=True)))

    def result(self, model: str, request_id: str) -> dict[str, Any]:
        """The result of a COMPLETED request; FalError (with fal's code) if it failed.

        fal_client's own `result()` polls status until COMPLETED with no bound, so this checks
        the status once first and raises `FalNotReady` instead of waiting.
        """
        st = self.status(model, request_id)
        if not st.done:
            raise _not_ready(request_id, st)
        out = _call(lambda: self._client.result(model, request_id))
        if not isinstance(out, dict):
            raise FalError(f"unexpected fal result: {out!r}")
        return out

    def cancel(self, model: str, request_id: str) -> None:
        """`PUT .../requests/{id}/cancel`. A request that already finished answers 400
        (`ALREADY_COMPLETED`): FalError with status_code 400, not retryable."""
        _call(lambda: self._client.cancel(model, request_id))

    def upload(self, data: bytes, content_type: str, file_name: str | None = None) -> str:
        """Puts a file into fal's storage with fal_client's own `upload` (a CDN token from
        `POST {REST_URL}/storage/auth/token`, then `POST {CDN_URL}/files/upload`, falling back
        to `/storage/upload/initiate` + `PUT`); returns the file's URL at fal."""
        return _call(lambda: self._client.upload(data, content_type, file_name))


class AsyncFalAPI:
    """Asyncio client. Its httpx.AsyncClient belongs to the loop that first uses it."""

    def __init__(self, key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._client = fal_client.AsyncClient(key=key, default_timeout=timeout)
        self._used = False

    async def submit(self, model: str, arguments: dict[str, Any], webhook_url: str | None = None) -> str:
        self._used = True
        handle = await _acall(lambda: self._client.submit(model, arguments, webhook_url=webhook_url))
        return handle.request_id

    async def status(self, model: str, request_id: str) -> FalStatus:
        self._used = True
        st = await _acall(lambda: self._client.status(model, request_id, with_logs=True))
        return _to_status(st)

    async def result(self, model: str, request_id: str) -> dict[str, Any]:
        st = await self.status(model, request_id)
        if not st.done:
            raise _not_ready(request_id, st)
        out = await _acall(lambda: self._client.result(model, request_id))
        if not isinstance(out, dict):
            raise FalError(f"unexpected fal result: {out!r}")
        return out

    async def cancel(self, model: str, request_id: str) -> None:
        self._used = True
        await _acall(lambda: self._client.cancel(model, request_id))

    async def aclose(self) -> None:
        if self._used:
            client: httpx.AsyncClient = await self._client._client
            await client.aclose()


# --- module-level convenience (shared FalAPI) ----------------------------------------------

_default_lock = threading.Lock()
_default: tuple[tuple[str | None, ...], FalAPI] | None = None


def _default_api() -> FalAPI:
    """A shared FalAPI, rebuilt when FAL_KEY or the TLS trust variables change."""
    global _default
    env_key = tuple(os.environ.get(v) for v in ("FAL_KEY", "FAL_KEY_ID", "SSL_CERT_FILE", "SSL_CERT_DIR"))
    with _default_lock:
        if _default is None or _default[0] != env_key:
            _default = (env_key, FalAPI())
        return _default[1]


def submit(model: str, arguments: dict[str, Any], webhook_url: str | None = None) -> str:
    return _default_api().submit(model, arguments, webhook_url)


def status(model: str, request_id: str) -> FalStatus:
    return _default_api().status(model, request_id)


def result(model: str, request_id: str) -> dict[str, Any]:
    return _default_api().result(model, request_id)


def cancel(model: str, request_id: str) -> None:
    _default_api().cancel(model, request_id)


def upload(data: bytes, content_type: str, file_name: str | None = None) -> str:
    return _default_api().upload(data, content_type, file_name)


# --- webhook and result helpers -------------------------------------------------------------


def parse_webhook(body: Mapping[str, Any]) -> FalWebhook:
    """Parses fal's webhook body:

    `{"request_id", "gateway_request_id", "status": "OK"|"ERROR", "payload": {...}|null,
    "error"?: str, "payload_error"?: str}`. Raises ValueError when it is not that shape.
    """
    if not isinstance(body, Mapping):
        raise ValueError("fal webhook body must be a JSON object")
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("fal webhook body has no request_id")
    state = body.get("status")
    payload = body.get("payload")
    if state == "OK":
        if isinstance(payload, dict):
            return FalWebhook(request_id, True, payload)
        if payload is None:
            return FalWebhook(request_id, True, None)
        raise ValueError("fal webhook payload must be an object or null")
    if state == "ERROR":
        error = body.get("error")
        detail = payload.get("detail") if isinstance(payload, Mapping) else None
        detail_msg = _detail_message(detail) if detail is not None else ""
        parts = [str(p) for p in (error, detail_msg or body.get("payload_error")) if p]
        message = ": ".join(parts) or "fal request failed"
        status_code = _status_code_from_error(error)
        return FalWebhook(
            request_id,
            False,
            FalError(
                message,
                status_code=status_code,
                # The request itself failed; re-running it is the caller's decision.
                retryable=False,
                error_type=payload.get("error_type") if isinstance(payload, Mapping) else None,
            ),
        )
    raise ValueError(f"fal webhook status must be OK or ERROR, not {state!r}")


def _status_code_from_error(error: Any) -> int | None:
    # fal writes e.g. "Invalid status code: 422".
    if isinstance(error, str):
        tail = error.rsplit(":", 1)[-1].strip()
        if tail.isdigit():
            return int(tail)
    return None


def image_urls(result: Mapping[str, Any] | None) -> list[str]:
    """URLs of the images in a fal result: `images[].url`, or a single `image.url`."""
    if not isinstance(result, Mapping):
        return []
    urls: list[str] = []
    images = result.get("images")
    candidates: list[Any] = list(images) if isinstance(images, list) else []
    if "image" in result:
        candidates.append(result["image"])
    for item in candidates:
        url = item.get("url") if isinstance(item, Mapping) else item
        if isinstance(url, str) and url and url not in urls:
            urls.append(url)
    return urls
