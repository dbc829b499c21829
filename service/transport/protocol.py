"""uvicorn's httptools protocol with the limits a public server needs and uvicorn does not have.

- A header timeout: a connection must deliver a complete request head within
  `header_timeout_s` of opening (or of the first byte of a later request), else it is closed.
  uvicorn times out idle keep-alive connections only, so a client trickling a header (slowloris)
  or connecting and sending nothing would otherwise hold a connection forever.
- Head limits: a request head (request line plus headers) may not pass `max_header_bytes` nor
  carry more than `max_header_count` header lines; beyond either the client gets a JSON 431 and the
  connection closes. uvicorn has neither limit, and the cost of a long head is quadratic: httptools
  and uvicorn grow a URL or header value split over many reads by concatenation, on the event loop,
  so one client trickling a multi-megabyte header (11 s of CPU for 8 MiB in 1 KiB reads) stalls every
  other connection. The bytes are therefore counted *before* the parser sees them (see
  `data_received`), so it never holds more than `max_header_bytes` of a head. Trailer fields after
  a chunked body are parsed like headers and cost the same, so they get the same two limits.
- Chunk framing: a chunked body costs the event loop a parser callback per chunk (~0.4 µs), so
  one-byte chunks made a body cost ~65 ns of CPU per byte sent instead of ~1 (a 6 MB body: 0.39 s).
  Past its first `FREE_CHUNKS` chunks a body must average `MIN_CHUNK_BYTES` per chunk, else the
  connection is closed (the app is already reading the body: no answer can follow).
- A connection cap: requests arriving on connections beyond `max_connections` get a JSON 503 and
  `Connection: close` (uvicorn's own `limit_concurrency` answers in plain text).
- A drain signal: when uvicorn begins a graceful shutdown it calls `shutdown()` on every connection;
  the first call sets the app's draining event, so request bodies still arriving are refused at once
  instead of holding the shutdown open (see `service.transport.request_body`).

The app hands its limits to the protocol through the lifespan state (`ConnectionLimits` under
`LIMITS_STATE_KEY`), which uvicorn gives every connection: the same path works for one process and
for several workers, and without a lifespan (tests' in-process client) nothing changes.

This module is the one place that relies on uvicorn internals (the uvicorn range pyproject.toml pins):
the `HttpToolsProtocol` methods it overrides (the httptools parser callbacks `on_message_begin`,
`on_header`, `on_headers_complete`, `on_body`, `on_message_complete`, plus `on_response_complete` and
`shutdown`) and the attributes `app`, `app_state`, `connections`, `cycle` (with `response_complete`),
`parser`, `server_state`, `transport`, `loop` and `client`. It also relies on httptools calling
`on_chunk_header` and `on_chunk_complete` on a protocol that has them, which uvicorn's has not.
An override uvicorn stopped calling would drop its limit silently, so `python -m service` refuses to
start when one is missing (`uvicorn_hook_problems`); tests/service/test_library_internals.py and
tests/service/test_request_heads.py fail if any of this changes.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

LIMITS_STATE_KEY = "convserve.connection_limits"
FREE_CHUNKS = 256
"""Chunks a chunked request body may have whatever their size, a count."""
MIN_CHUNK_BYTES = 256
"""Average chunk payload a chunked body must keep past `FREE_CHUNKS`, in bytes (clients send 8-64 KiB)."""
_BLANK_LINE = b"\r\n\r\n"  # ends a head; the parser refuses bare-LF heads, so no other ending exists
# httptools calls these on any protocol that defines them; uvicorn's does not, so they override nothing.
HTTPTOOLS_CALLBACKS = frozenset({"on_chunk_header", "on_chunk_complete"})


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    max_connections: int
    max_header_bytes: int
    """Largest request head (request line plus headers, blank line included), in bytes."""
    max_header_count: int
    """Most header lines one request head may carry."""
    draining: asyncio.Event
    on_refused: Callable[[str], None]
    """Called with a reason ("header_timeout", "too_many_connections", "header_too_large") each time a
    client is refused."""


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


def _bytes_after_last(mark: bytes, before: bytes, piece: bytes) -> int:
    """Bytes of `piece` after the last `mark` in the stream `before + piece` (all of it if none)."""
    found = piece.rfind(mark)
    if found >= 0:
        return len(piece) - found - len(mark)
    seam = (before + piece[: len(mark) - 1]).rfind(mark)
    return len(piece) - (seam + len(mark) - len(before)) if seam >= 0 else len(piece)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` plus a header timeout, head limits, a connection cap and a drain signal."""

    _head_timer: asyncio.TimerHandle | None = None
    # Per request. The parser's callbacks move these; `data_received` reads them to decide how much
    # the parser may take next.
    _in_head = True  # the next byte belongs to a head (or to blank lines before one)
    _head_bytes = 0  # bytes of the current head (or trailer section) handed to the parser
    _header_lines = 0  # header lines of the current head (or trailer section)
    _content_length: int | None = None
    _body_left: int | None = None  # body bytes the parser still expects; None: chunked (or none)
    # A chunk-size line was parsed and no chunk data followed yet: either the data of that chunk is
    # still to come, or it was the last chunk and its trailer fields (parsed like headers) follow.
    _after_chunk_line = False
    # Per piece (see `data_received`).
    _message_ended = False
    _chunk_line_seen = False
    _chunks = 0  # chunks of the current chunked body, and their payload bytes
    _chunk_bytes = 0
    _recent = b""  # the last 3 bytes fed, so a blank line split across reads is found
    # Per connection, once a head is refused.
    _refused = False
    _refusal: bytes | None = None  # the 431, until the answers to earlier requests are out
    _linger: asyncio.TimerHandle | None = None

    @property
    def _limits(self) -> ConnectionLimits | None:
        limits = self.app_state.get(LIMITS_STATE_KEY)
        return limits if isinstance(limits, ConnectionLimits) else None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser piece by piece, so that it never holds more of a head than its limit.

        A piece ends where the current head ends (its blank line) or where a Content-Length body
        ends, so the bytes after it (a body, the next pipelined request) never count against the
        head, and every request's head starts a piece and gets its own count. Cutting the stream
        never changes what the parser makes of it; it only bounds how much it sees at once.
        """
        limits = self._limits
        if limits is None:
            super().data_received(data)
            return
        offset = 0
        while offset < len(data) and not self._refused:
            size = self._piece_size(data, offset, limits)
            if size == 0:
                self._refuse_oversized(limits)
                return
            piece = data if size == len(data) else data[offset : offset + size]
            offset += size
            chunked_body = not self._in_head and self._body_left is None
            if self._in_head or self._after_chunk_line:
                self._head_bytes += size
            before, self._recent = self._recent, (self._recent + piece[-3:])[-3:]
            self._message_ended = self._chunk_line_seen = False
            super().data_received(piece)
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # uvicorn answered 400 and closed, or handed the connection to a WebSocket
            if self._message_ended and self.parser.should_upgrade():
                return  # as in uvicorn, what follows an upgrade request in the same read is dropped
            if chunked_body:
                self._recount_after_chunked(before, piece, limits)

    def _piece_size(self, data: bytes, offset: int, limits: ConnectionLimits) -> int:
        """How many bytes from `offset` the parser may take now; 0 when a head passes its limit."""
        available = len(data) - offset
        if not (self._in_head or self._after_chunk_line):
            return min(available, self._body_left) if self._body_left else available
        room = limits.max_header_bytes - self._head_bytes
        if room <= 0:
            return 0
        seam = (self._recent + data[offset : offset + 3]).find(_BLANK_LINE)
        if seam >= 0:
            end = seam + len(_BLANK_LINE) - len(self._recent)
        else:
            found = data.find(_BLANK_LINE, offset, offset + room)
            end = found + len(_BLANK_LINE) - offset if found >= 0 else 0
        return end if 0 < end <= room else min(available, room)

    def _recount_after_chunked(self, before: bytes, piece: bytes, limits: ConnectionLimits) -> None:
        """Count what a piece of a chunked body left open of a new head or of trailers.

        A chunked body's framing is only known to the parser, so such a piece went to it whole (at
        most one read, parsed once: no quadratic cost) and what it left open is inferred: a chunked
        message ends with a blank line, and the trailer line still open starts after the last line
        end (complete ones count as lines). A pipelined head that begins and ends inside such a
        piece is not measured: it is at most one read, and its header lines are still counted.
        """
        if self._message_ended and self._in_head:
            self._head_bytes = _bytes_after_last(_BLANK_LINE, before, piece)
        elif self._chunk_line_seen and self._after_chunk_line:
            self._head_bytes = _bytes_after_last(b"\r\n", before, piece)
        if self._head_bytes > limits.max_header_bytes:
            self._refuse_oversized(limits)

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._arm_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        limits = self._limits
        if limits is not None:
            self._header_lines += 1
            if self._header_lines > limits.max_header_count:
                self._refuse(
                    limits,
                    f"the request carries more than {limits.max_header_count} header lines "
                    "(CONVSERVE_MAX_HEADER_COUNT); send fewer headers, e.g. join repeated ones "
                    "with commas",
                )
                return
            if self._in_head and name.lower() == b"content-length":
                self._content_length = int(value) if value.strip().isdigit() else None
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return  # the app never sees a refused request
        self._in_head, self._header_lines, self._body_left = False, 0, self._content_length
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

    def on_chunk_header(self) -> None:
        # uvicorn has no use for chunk events; httptools calls these when the protocol has them.
        if self._refused:
            return
        self._after_chunk_line = self._chunk_line_seen = True
        self._head_bytes = 0
        self._chunks += 1
        limits = self._limits
        if (
            limits is not None
            and self._chunks > FREE_CHUNKS
            and self._chunk_bytes < MIN_CHUNK_BYTES * (self._chunks - 1)  # the chunks before this one
        ):
            self._refused = True
            limits.on_refused("bad_input")
            logger.info(
                "closing the connection from %s: %d chunks carried %d bytes (chunks must average %d bytes)",
                self._peer(),
                self._chunks,
                self._chunk_bytes,
                MIN_CHUNK_BYTES,
            )
            self.transport.close()

    def on_chunk_complete(self) -> None:
        self._after_chunk_line = False

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return  # the body of a refused request: `self.cycle` is still an earlier request's
        self._after_chunk_line = False
        if self._body_left is not None:
            self._body_left -= len(body)
        else:
            self._chunk_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_head, self._after_chunk_line, self._message_ended = True, False, True
        self._head_bytes = self._header_lines = self._chunks = self._chunk_bytes = 0
        self._content_length = self._body_left = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusal is not None and not self._answering():
            self._send_refusal()

    def shutdown(self) -> None:
        limits = self._limits
        if limits is not None:
            limits.draining.set()
        super().shutdown()

    def _answering(self) -> bool:
        """Whether a response to an earlier request (or a queued pipelined one) is still to be sent."""
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse_oversized(self, limits: ConnectionLimits) -> None:
        where = "request line and headers" if self._in_head else "trailer fields after the chunked body"
        self._refuse(
            limits,
            f"the {where} are larger than {limits.max_header_bytes} bytes (CONVSERVE_MAX_HEADER_BYTES); "
            "send a shorter URL and fewer or shorter headers, and put data in the body",
        )

    def _refuse(self, limits: ConnectionLimits, message: str) -> None:
        """Answer 431 and close, once the answers to earlier (pipelined) requests are out."""
        self._refused = True
        self._disarm_head_timer()
        limits.on_refused("header_too_large")
        logger.info("refusing a request from %s: %s", self._peer(), message)
        if not self._in_head:
            # Trailers: the app is already answering this request, so no 431 can follow; it is told
            # that the client went away.
            self.transport.close()
            return
        body = json.dumps({"error": message}).encode()
        head = [b"HTTP/1.1 431 Request Header Fields Too Large"]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json", b"content-length: %d" % len(body)]
        self._refusal = b"\r\n".join([*head, b"connection: close", b"", body])
        if not self._answering():
            self._send_refusal()

    def _send_refusal(self) -> None:
        response, self._refusal = self._refusal, None
        if response is None or self.transport.is_closing():
            return
        self.transport.write(response)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Closing now, with the rest of the head still arriving, would make the kernel answer it with
        # a reset that can destroy the 431 before the client reads it. So only the sending side
        # closes; what still arrives is dropped unparsed (see `data_received`) until the client
        # closes, for at most the header timeout.
        self.transport.write_eof()
        limits = self._limits
        linger_s = limits.header_timeout_s if limits is not None else 0.0
        self._linger = self.loop.call_later(linger_s, self.transport.close)

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
        logger.info("closing the connection from %s: no complete request head in time", self._peer())
        if not self.transport.is_closing():
            self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"


def uvicorn_hook_problems(protocol: type[HttpToolsProtocol] = GuardedHttpToolsProtocol) -> list[str]:
    """What the installed uvicorn lacks for `protocol`'s overrides to take effect.

    Every public method the class defines (httptools' chunk callbacks aside) must still exist on
    `HttpToolsProtocol` with the same parameters: uvicorn never calls an override of a method it renamed,
    and the limit that override enforces would silently stop applying. Empty when all is in place.
    """
    problems = []
    for name, override in vars(protocol).items():
        if name.startswith("_") or name in HTTPTOOLS_CALLBACKS or not callable(override):
            continue
        base = getattr(HttpToolsProtocol, name, None)
        if not callable(base):
            problems.append(f"HttpToolsProtocol.{name} is gone")
            continue
        expected = list(inspect.signature(override).parameters)
        if list(inspect.signature(base).parameters) != expected:
            problems.append(f"HttpToolsProtocol.{name}{inspect.signature(base)} no longer takes {expected}")
    return problems
