"""The service's error hierarchy: each class carries its HTTP status; one handler renders them all.

Messages are written for the client: what was wrong and what is expected instead. `reject_reason`
names the `convserve_rejected_total{reason}` label an error counts under (None: not counted).
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """Base class: a failure the service reports as `{"error": message}` with `status_code`."""

    status_code: ClassVar[int] = 500
    reject_reason: ClassVar[str | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Extra HTTP response headers for this error."""
        return {}


class BadRequestError(ServiceError):
    """The request is malformed (not parseable, missing parts)."""

    status_code = 400
    reject_reason = "bad_input"


class InvalidInputError(ServiceError):
    """The request is well-formed but its content cannot be used (bad image, wrong tensor shape)."""

    status_code = 422
    reject_reason = "bad_input"


class PayloadTooLargeError(ServiceError):
    """The body (or the number of images in it) is over a configured limit."""

    status_code = 413
    reject_reason = "bad_input"


class RequestTimeoutError(ServiceError):
    """The client sent its body too slowly (CONVSERVE_BODY_TIMEOUT_S, CONVSERVE_MIN_BODY_RATE)."""

    status_code = 408
    reject_reason = "slow_client"


class ClientDisconnectedError(ServiceError):
    """The client closed the connection before its body arrived; nobody reads the answer."""

    status_code = 400
    reject_reason = "bad_input"


class UnsupportedMediaTypeError(ServiceError):
    """The Content-Type is not one the endpoint accepts."""

    status_code = 415
    reject_reason = "bad_input"


class NotFoundError(ServiceError):
    """The model or version named in the URL is not the one this server serves."""

    status_code = 404


class ServiceUnavailableError(ServiceError):
    """The model is not ready yet (loading, warming up) or the server is shutting down."""

    status_code = 503


class InsufficientStorageError(ServiceError):
    """No room: a model version needs more memory than CONVSERVE_MEMORY_BUDGET_MB allows all versions
    together, or a gallery is at its entry or byte limit."""

    status_code = 507


class QueueFullError(ServiceUnavailableError):
    """The batching queue holds MAX_QUEUE_SIZE images already; the client should retry later."""

    reject_reason = "queue_full"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class DeadlineExceededError(ServiceError):
    """The request's deadline (REQUEST_TIMEOUT_S) passed before its images reached the model."""

    status_code = 504
    reject_reason = "timeout"


class InferenceError(ServiceError):
    """ONNX Runtime failed on the batch this request was part of."""

    status_code = 500


class StartupError(RuntimeError):
    """The service cannot start with this configuration or model; the message says how to fix it."""
