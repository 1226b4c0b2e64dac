"""One exception tree for the core; the HTTP layer maps it to the contract's error shape in one place.

ApiError (code, status, message, details)
├── BadRequest            400 BAD_REQUEST
├── Unauthorized          401 UNAUTHORIZED
├── InsufficientCredits   402 INSUFFICIENT_CREDITS
├── Forbidden             403 FORBIDDEN
├── NotFound              404 NOT_FOUND
├── Conflict              409 (JOB_FINISHED, IDEMPOTENCY_KEY_IN_USE)
├── PayloadTooLarge       413 PAYLOAD_TOO_LARGE
├── ValidationFailed      422 (VALIDATION_ERROR, IDEMPOTENCY_KEY_REUSED, WEBHOOK_URL_FORBIDDEN)
├── RateLimited           429 RATE_LIMITED
└── Unavailable           503 UNAVAILABLE
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 500
    code = "INTERNAL"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        return {"error": err}


class BadRequest(ApiError):
    status, code = 400, "BAD_REQUEST"


class Unauthorized(ApiError):
    status, code = 401, "UNAUTHORIZED"


class InsufficientCredits(ApiError):
    status, code = 402, "INSUFFICIENT_CREDITS"


class Forbidden(ApiError):
    status, code = 403, "FORBIDDEN"


class NotFound(ApiError):
    status, code = 404, "NOT_FOUND"


class Conflict(ApiError):
    status, code = 409, "CONFLICT"


class PayloadTooLarge(ApiError):
    status, code = 413, "PAYLOAD_TOO_LARGE"


class ValidationFailed(ApiError):
    status, code = 422, "VALIDATION_ERROR"


class RateLimited(ApiError):
    status, code = 429, "RATE_LIMITED"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, details={"retryAfterSeconds": retry_after_s})
        self.retry_after_s = retry_after_s


class Unavailable(ApiError):
    status, code = 503, "UNAVAILABLE"


class IllegalTransition(Exception):
    """A transition the state machine does not allow (e.g. anything out of a final status)."""


class JobCancelled(Exception):
    """Raised inside a running task when its job was cancelled or otherwise finished elsewhere."""
