"""Per-request bookkeeping as plain ASGI middleware: request id, metrics and one log line.

Plain ASGI rather than `BaseHTTPMiddleware`, which would buffer every response through an extra task.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

logger = logging.getLogger("service.access")

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Probes and scrapes arrive every few seconds; logging them at INFO would drown the real traffic.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(candidate):  # never echo arbitrary bytes into logs
                return candidate
    return uuid.uuid4().hex[:16]


def _endpoint(scope: Scope) -> str:
    route: Any = scope.get("route")
    return str(getattr(route, "path", "unmatched"))


class RequestContextMiddleware:
    """Gives each HTTP request an id (echoed in `X-Request-ID`), records its metrics, logs one line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER.encode(), request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, request_id, status, time.perf_counter() - start)

    def _record(self, scope: Scope, request_id: str, status: int, seconds: float) -> None:
        endpoint = _endpoint(scope)
        self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.metrics.request_duration.labels(endpoint=endpoint).observe(seconds)
        level = logging.DEBUG if scope["path"] in _QUIET_PATHS and status < 400 else logging.INFO
        error = scope.get("state", {}).get("error")
        logger.log(
            level,
            "request_id=%s method=%s path=%s status=%d duration_ms=%.1f%s",
            request_id,
            scope["method"],
            scope["path"],
            status,
            seconds * 1000,
            f" error={error!r}" if error else "",
        )
