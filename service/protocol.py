"""uvicorn's httptools protocol with the limits a public server needs and uvicorn does not have.

- A header timeout: a connection must deliver a complete request head within
  `header_timeout_s` of opening (or of the first byte of a later request), else it is closed.
  uvicorn times out idle keep-alive connections only, so a client trickling a header (slowloris)
  or connecting and sending nothing would otherwise hold a connection forever.
- A connection cap: requests arriving on connections beyond `max_connections` get a JSON 503 and
  `Connection: close` (uvicorn's own `limit_concurrency` answers in plain text).
- A drain signal: when uvicorn begins a graceful shutdown it calls `shutdown()` on every connection;
  the first call sets the app's draining event, so request bodies still arriving are refused at once
  instead of holding the shutdown open (see `service.request_body`).

The app hands its limits to the protocol through the lifespan state (`ConnectionLimits` under
`LIMITS_STATE_KEY`), which uvicorn gives every connection: the same path works for one process and
for several workers, and without a lifespan (tests' in-process client) nothing changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

LIMITS_STATE_KEY = "convserve.connection_limits"


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    max_connections: int
    draining: asyncio.Event
    on_refused: Callable[[str], None]
    """Called with a reason ("header_timeout", "too_many_connections") each time a client is refused."""


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    body = json.dumps(
        {"error": "the server has too many open connections (CONVSERVE_MAX_CONNECTIONS); retry shortly"}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` plus a header timeout, a connection cap and a drain signal."""

    _head_timer: asyncio.TimerHandle | None = None

    @property
    def _limits(self) -> ConnectionLimits | None:
        limits = self.app_state.get(LIMITS_STATE_KEY)
        return limits if isinstance(limits, ConnectionLimits) else None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        limits = self._limits
        if limits is None or len(self.connections) <= limits.max_connections:
            super().on_headers_complete()
            return
        limits.on_refused("too_many_connections")
        app, self.app = self.app, _too_many_connections
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def shutdown(self) -> None:
        limits = self._limits
        if limits is not None:
            limits.draining.set()
        super().shutdown()

    def _arm_head_timer(self) -> None:
        limits = self._limits
        if limits is not None and self._head_timer is None:
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        limits = self._limits
        if limits is not None:
            limits.on_refused("header_timeout")
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"
        logger.info("closing the connection from %s: no complete request head in time", client)
        if not self.transport.is_closing():
            self.transport.close()
