"""What every gRPC call goes through, as REST requests do in `service.transport`: the token its method's
role needs, a request id, the status its error maps to, one metric sample and one log line.

The gRPC counterpart of `service.transport.access`, `service.transport.middleware` and
`service.protocols.error_handlers`, reusing their rules rather than restating them: tokens are
checked by `check_token_of` on the call's metadata (`authorization: Bearer <token>` or
CONVSERVE_TOKEN_HEADER), the request id is the client's `x-request-id` when valid, a refusal counts
in `convserve_rejected_total` under the error's own reason, and every 4xx-class refusal waits
CONVSERVE_CLIENT_ERROR_DELAY_S first. A `ServiceError` keeps its message; its HTTP status picks the
gRPC status in `GRPC_STATUS`, the one table. `convserve_requests_total` records the HTTP status the
same answer gets over REST (200 for OK), so dashboards and alerts read both protocols alike; the
log line names the gRPC status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from service.errors import ServiceError, ServiceUnavailableError
from service.metrics import Metrics
from service.protocols.v2proto import method_path
from service.transport.access import Credentials, Role, check_token_of
from service.transport.middleware import REQUEST_ID_HEADER, request_id_of

logger = logging.getLogger("service.access")

GRPC_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    # RESOURCE_EXHAUSTED, not INVALID_ARGUMENT: it is what gRPC itself answers for a message beyond
    # MAX_UPLOAD_BYTES, so a request over a size limit gets one status whichever layer measured it.
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,  # a model version larger than the whole memory budget
}
"""The gRPC status of each HTTP status a `ServiceError` carries; any other 4xx is INVALID_ARGUMENT,
any other 5xx INTERNAL."""

# Health RPCs arrive every few seconds from probes; like REST's probes they are logged at DEBUG.
_QUIET_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
_CLIENT_GONE = 400  # what REST records for a client that left before its answer (ClientDisconnectedError)

Reply = TypeVar("Reply")


def grpc_status(http_status: int) -> grpc.StatusCode:
    """The gRPC status of an answer REST gives `http_status`."""
    default = grpc.StatusCode.INVALID_ARGUMENT if 400 <= http_status < 500 else grpc.StatusCode.INTERNAL
    return GRPC_STATUS.get(http_status, default)


@dataclass
class Call:
    """One RPC as its method sees it: the id it is logged under, when it arrived, and which model
    version answered (set by the method once it has resolved one)."""

    method: str
    request_id: str
    arrived_at: float
    """`time.monotonic()` when the method was called: the request's deadline counts from here."""
    model: tuple[str, str] = ("", "")


class _Refused(Exception):
    """A refusal on its way to the one place errors are answered: an HTTP status, the
    `convserve_rejected_total` reason (None: not counted) and the message for the client."""

    def __init__(self, status: int, reason: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    @classmethod
    def of(cls, error: ServiceError) -> _Refused:
        return cls(error.status_code, error.reject_reason, error.message)


class CallRunner:
    """Runs each RPC method inside the bookkeeping every call gets (see the module docstring)."""

    def __init__(self, metrics: Metrics, credentials: Credentials, error_delay_s: float) -> None:
        self.metrics = metrics
        self.credentials = credentials
        self.error_delay_s = error_delay_s
        self.closing = False
        """Set when the server drains: new calls are refused (UNAVAILABLE) before anything else."""
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no call is running (set `closing` first, or calls keep coming)."""
        await self._idle.wait()

    async def run(
        self,
        method: str,
        role: Role,
        context: grpc.aio.ServicerContext[Any, Any],
        handler: Callable[[Call], Awaitable[Reply]],
    ) -> Reply:
        """`handler(call)`'s reply once the caller may call `method`; its error as a gRPC status."""
        # Metadata as the (bytes, bytes) header pairs the REST checks read; `-bin` values are bytes
        # and carry no token or id.
        headers = [
            (key.encode("latin-1"), value.encode("latin-1", "replace"))
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)
        ]
        call = Call(method, request_id_of(headers), time.monotonic())
        context.set_trailing_metadata(((REQUEST_ID_HEADER, call.request_id),))
        started = time.perf_counter()
        http_status, error = 200, ""
        self._in_flight += 1
        self._idle.clear()
        try:
            if self.closing:
                raise _Refused.of(
                    ServiceUnavailableError("the server is shutting down; retry on another replica")
                )
            refusal = check_token_of({"headers": headers}, role, self.credentials)
            if refusal is not None:
                raise _Refused(refusal.status, refusal.reason, refusal.message)
            try:
                return await handler(call)
            except ServiceError as exc:
                raise _Refused.of(exc) from exc
        except _Refused as refused:
            http_status, error = refused.status, refused.message
            if refused.reason is not None:
                self.metrics.rejected.labels(reason=refused.reason).inc()
            if 400 <= http_status < 500 and self.error_delay_s:  # as REST: see service.transport.middleware
                await asyncio.sleep(self.error_delay_s)
            await context.abort(grpc_status(http_status), refused.message)
            raise  # not reached: abort raises
        except asyncio.CancelledError:
            # The client cancelled, or its deadline passed (gRPC then answers DEADLINE_EXCEEDED itself).
            remaining = context.time_remaining()
            http_status = 504 if remaining is not None and remaining <= 0 else _CLIENT_GONE
            error = "the client's deadline passed" if http_status == 504 else "the client cancelled the call"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # a bug, not the client's fault: logged once, answered, server stays up
            http_status, error = 500, f"internal error: {type(exc).__name__}"
            logger.error("request_id=%s unhandled error in %s", call.request_id, method, exc_info=exc)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal server error (request id {call.request_id}); the server log has the details, "
                "and retrying may help",
            )
            raise  # not reached: abort raises
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
            self._record(call, http_status, error, time.perf_counter() - started)

    def _record(self, call: Call, http_status: int, error: str, seconds: float) -> None:
        model, version = call.model
        labels = {"protocol": "grpc", "endpoint": call.method, "model": model, "version": version}
        self.metrics.requests.labels(status=str(http_status), **labels).inc()
        self.metrics.request_duration.labels(**labels).observe(seconds)
        status = "OK" if http_status == 200 else grpc_status(http_status).name
        path = method_path(call.method)
        quiet = call.method in _QUIET_METHODS and http_status < 400
        logger.log(
            logging.DEBUG if quiet else logging.INFO,
            "request_id=%s method=POST path=%s status=%s duration_ms=%.1f%s",
            call.request_id,
            path,
            status,
            seconds * 1000,
            f" error={error!r}" if error else "",
            extra={
                "request_id": call.request_id,
                "model": model,
                "version": version,
                "status": status,
                "duration_ms": round(seconds * 1000, 1),
                "method": "POST",
                "path": path,
                "protocol": "grpc",
            },
        )
