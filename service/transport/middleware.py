"""Per-request bookkeeping as plain ASGI middleware: request id, arrival time, metrics, one log line,
and the body bytes the request holds (counted against the worker's `BodyBudget` until it ends).

Every 4xx answer waits `client_error_delay_s` first (an `asyncio.sleep`: no CPU, only this
connection waits). Refusing is cheap, but one client sending thousands of refused requests a second
took the event loop, and with it CPU, from everyone else: in the soak's interference phase a normal
client's p99 rose to 3-4x idle beside a client repeating refused admin calls or V2 requests with
repeated outputs. With the delay such a client gets at most 1/delay answers a second per connection;
a client with a bug sees its error 50 ms later.

It is also the last line of defence: an exception no handler turned into a response becomes our
JSON 500 (with `X-Request-ID`, logged once), and any error response sent before the request body
was fully read says `Connection: close`, so the unread bytes can never be parsed as the next request
and the client knows to open a new connection. Plain ASGI rather than `BaseHTTPMiddleware`, which
would buffer every response through an extra task.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics
from service.textsafety import printable
from service.transport.body_budget import BodyBudget

logger = logging.getLogger("service.access")

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Probes and scrapes arrive every few seconds; logging them at INFO would drown the real traffic.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


# Ids we make: a random per-process prefix and a counter, unique across replicas and restarts like a
# uuid4, without its urandom system call on every request.
_ID_PREFIX = secrets.token_hex(4)
_id_counter = itertools.count()


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's `X-Request-ID` if it is a safe one to echo and log, else a new id."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(candidate):  # never echo arbitrary bytes into logs
                return candidate
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFF:08x}"


# An error answered before the body was read: a small body is read and dropped first, because closing
# a socket with unread data makes the kernel send a reset, and the client may lose the answer with it.
_DRAIN_LIMIT_BYTES = 1 << 20
_DRAIN_TIMEOUT_S = 0.5


def _declared_body(scope: Scope) -> int | None:
    """Content-Length (0 when there is no body), or None for a chunked or malformed one."""
    length = 0
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            text = value.strip()
            if not (text.isascii() and text.isdigit()):
                return None
            length = int(text)
    return length


def _endpoint(scope: Scope) -> str:
    route: Any = scope.get("route")
    return str(getattr(route, "path", "unmatched"))


class _Exchange:
    """What the middleware learns about one request while it runs."""

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        budget: BodyBudget,
        gauge: Any,
        error_delay_s: float,
    ) -> None:
        self.request_id = request_id_of(scope.get("headers", []))
        self.state: dict[str, Any] = scope.setdefault("state", {})
        self.error_delay_s = error_delay_s
        self.budget, self.gauge = budget, gauge
        self.held_bytes = 0
        """Body bytes the app received, counted in `budget` until the request ends."""
        self.status = 500
        self.started = False
        self.declared_body = _declared_body(scope)
        self.body_pending = self.declared_body != 0
        self._receive, self._send = receive, send

    async def receive(self) -> Message:
        message = await self._next()
        size = len(message.get("body", b"")) if message["type"] == "http.request" else 0
        if size:
            self.budget.take(size)  # BodyBudgetError: a 503 for this request, nothing else touched
            self.held_bytes += size
            self.gauge.set(self.budget.held_bytes)
        return message

    async def _next(self) -> Message:
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_pending = False
        return message

    def release(self) -> None:
        """Give back every body byte this request held."""
        if self.held_bytes:
            self.budget.give(self.held_bytes)
            self.held_bytes = 0
            self.gauge.set(self.budget.held_bytes)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
            if 400 <= self.status < 500 and self.error_delay_s:
                await asyncio.sleep(self.error_delay_s)
            headers = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), self.request_id.encode())]
            load_s = self.state.get("model_load_s")
            if load_s is not None:  # the request waited for its model version to load on demand
                headers.append((b"server-timing", f"load;dur={load_s * 1000:.1f}".encode()))
            if self.status >= 400 and self.body_pending and not await self._drain():
                headers.append((b"connection", b"close"))
            message["headers"] = headers
        await self._send(message)

    async def _drain(self) -> bool:
        """Read and drop the rest of a small body (True), so the connection stays clean and usable."""
        if self.declared_body is None or self.declared_body > _DRAIN_LIMIT_BYTES:
            return False
        try:
            async with asyncio.timeout(_DRAIN_TIMEOUT_S):
                while self.body_pending:  # dropped at once: not counted in the budget
                    if (await self._next())["type"] == "http.disconnect":
                        return False
        except TimeoutError:
            return False
        return True

    async def send_internal_error(self) -> None:
        body = json.dumps(
            {
                "error": f"internal server error (request id {self.request_id}); the server log has the "
                "details, and retrying may help"
            }
        ).encode()
        await self.send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await self.send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Gives each HTTP request an id (echoed in `X-Request-ID`), records its metrics, logs one line."""

    def __init__(self, app: ASGIApp, metrics: Metrics, budget: BodyBudget, error_delay_s: float) -> None:
        self.app = app
        self.metrics = metrics
        self.budget = budget
        self.error_delay_s = error_delay_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(
            scope,
            receive,
            send,
            budget=self.budget,
            gauge=self.metrics.body_bytes,
            error_delay_s=self.error_delay_s,
        )
        state = exchange.state
        state["request_id"], state["arrived_at"] = exchange.request_id, time.monotonic()
        start = time.perf_counter()
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception as exc:  # no handler answered: still one JSON 500, logged once, connection kept sane
            logger.error("request_id=%s unhandled error", exchange.request_id, exc_info=exc)
            state["error"] = f"internal error: {type(exc).__name__}"
            if not exchange.started:  # (a half-read body still gets `Connection: close`)
                await exchange.send_internal_error()
        finally:
            exchange.release()
            self._record(scope, exchange.request_id, exchange.status, time.perf_counter() - start)

    def _record(self, scope: Scope, request_id: str, status: int, seconds: float) -> None:
        endpoint = _endpoint(scope)
        model, version = scope.get("state", {}).get("model", ("", ""))  # set when a model answered
        labels = {"protocol": "http", "endpoint": endpoint, "model": model, "version": version}
        self.metrics.requests.labels(status=str(status), **labels).inc()
        self.metrics.request_duration.labels(**labels).observe(seconds)
        level = logging.DEBUG if scope["path"] in _QUIET_PATHS and status < 400 else logging.INFO
        error = scope.get("state", {}).get("error")
        logger.log(
            level,
            "request_id=%s method=%s path=%s status=%d duration_ms=%.1f%s",
            request_id,
            scope["method"],
            printable(scope["path"]),
            status,
            seconds * 1000,
            f" error={error!r}" if error else "",
            # The same facts as fields, for the JSON log format (service.logging_config.REQUEST_FIELDS).
            extra={
                "request_id": request_id,
                "model": model,
                "version": version,
                "status": status,
                "duration_ms": round(seconds * 1000, 1),
                "method": scope["method"],
                "path": printable(scope["path"]),
                "protocol": "http",
                "error": error,
            },
        )
