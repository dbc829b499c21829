"""Reading request bodies within bounds: raw bytes, multipart image files, JSON and .npy tensors.

Every body is read under `BodyLimits`: the size limit is checked against Content-Length before
reading and again while streaming (chunked bodies have no Content-Length); a body that stalls for
`idle_timeout_s`, or that averages under `min_rate` bytes/s after its first `idle_timeout_s`, gets
408; a body still arriving when the server starts draining gets 503 (it was never accepted). So a
slow or lying client holds a connection for a bounded time and never delays shutdown.

Parsing never trusts a declared size: a `.npy` header must match the bytes that follow before
anything is allocated, JSON depth is bounded by the parser's recursion limit, and integers of any
length become floats (out of float32 range -> inf -> refused by the finiteness check).
CPU-heavy parsing (JSON tensors, .npy) is done by the caller off the event loop.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
import zlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request

from service.errors import (
    BadRequestError,
    ClientDisconnectedError,
    InvalidInputError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
)
from service.jsonparse import json_numbers, loads_json
from service.multipart import read_files
from service.predictor import NamedImage
from service.textsafety import printable

_MAX_FORM_FIELDS = 64
_MAX_NPY_HEADER_BYTES = 10_000
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


@dataclass(frozen=True)
class BodyLimits:
    """How much of a body the server reads, and how slowly it lets a client send it."""

    max_bytes: int
    idle_timeout_s: float
    min_rate: float
    """Bytes per second a body must average once it is older than `idle_timeout_s`."""
    draining: asyncio.Event | None = None
    """Set when the server begins a graceful shutdown."""


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is larger than {limit} bytes (CONVSERVE_MAX_UPLOAD_BYTES); "
        "send fewer or smaller images"
    )


async def _next_message(request: Request, timeout_s: float, draining: asyncio.Event | None) -> Any:
    """The next ASGI receive message, `None` on timeout; `ServiceUnavailableError` once draining."""
    if draining is None:
        try:
            return await asyncio.wait_for(request.receive(), timeout_s)
        except TimeoutError:
            return None
    receiving = asyncio.ensure_future(request.receive())
    drained = asyncio.ensure_future(draining.wait())
    try:
        done, _ = await asyncio.wait({receiving, drained}, timeout=timeout_s, return_when="FIRST_COMPLETED")
    finally:
        for task in (receiving, drained):
            task.cancel()
    if receiving in done:
        return receiving.result()
    if drained in done:
        raise ServiceUnavailableError(
            "the server is shutting down and the request body had not fully arrived; retry on another replica"
        )
    return None


async def _limited_stream(request: Request, limits: BodyLimits) -> AsyncGenerator[bytes, None]:
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limits.max_bytes:
        raise _too_large(limits.max_bytes)
    started, received = time.monotonic(), 0
    while True:
        # No gap over idle_timeout_s, and after the first idle_timeout_s an average of min_rate.
        rate_deadline = started + limits.idle_timeout_s + received / limits.min_rate
        timeout = min(limits.idle_timeout_s, rate_deadline - time.monotonic())
        message = await _next_message(request, max(timeout, 0.0), limits.draining)
        if message is None:
            raise RequestTimeoutError(
                f"the request body arrived too slowly ({received} bytes in "
                f"{time.monotonic() - started:.1f} s); "
                f"send it without pauses over {limits.idle_timeout_s:g} s and at {limits.min_rate:g} bytes/s "
                "or more (CONVSERVE_BODY_TIMEOUT_S, CONVSERVE_MIN_BODY_RATE)"
            )
        if message["type"] == "http.disconnect":
            raise ClientDisconnectedError("the client closed the connection before sending the whole body")
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limits.max_bytes:
            raise _too_large(limits.max_bytes)
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def read_body(request: Request, limits: BodyLimits) -> bytes:
    """The whole body within `limits` (413 too large, 408 too slow, 503 draining)."""
    return b"".join([chunk async for chunk in _limited_stream(request, limits)])


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a `Content-Encoding` of gzip or deflate, refusing output over `limit` bytes (zip bombs)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {printable(encoding)!r} is not supported; use gzip, deflate or none"
        )
    decompressor = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequestError(f"the body is not valid {encoding} data ({exc})") from exc
    if len(data) > limit:
        raise _too_large(limit)
    return data


async def read_images(request: Request, limits: BodyLimits, max_files: int) -> list[NamedImage]:
    """Every file part of a multipart/form-data body (any field name), in order."""
    files = await read_files(
        _limited_stream(request, limits),
        request.headers.get("content-type", ""),
        max_files=max_files,
        max_fields=_MAX_FORM_FIELDS,
    )
    if not files:
        raise BadRequestError(
            "the multipart body holds no files; attach images as file fields, e.g. `curl -F image=@cat.jpg`"
        )
    return [NamedImage(printable(part.filename or part.field), part.data) for part in files]


def parse_json_tensor(body: bytes) -> np.ndarray:
    """`{"inputs": <nested list [N, C, H, W]>}` -> float32 array; blocking for big bodies."""
    payload = loads_json(body, "the body")
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequestError('expected a JSON object {"inputs": <nested list of shape [N, C, H, W]>}')
    return json_numbers(payload["inputs"], '"inputs"')


def parse_npy_tensor(body: bytes) -> np.ndarray:
    """A `.npy` file (no pickles) -> array, its declared size checked against the bytes sent first."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        if version not in read_header:
            raise ValueError(f"format version {version} is not supported; use numpy.save")
        shape, fortran_order, dtype = read_header[version](stream, max_header_size=_MAX_NPY_HEADER_BYTES)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise InvalidInputError(
            f"the body is not a readable .npy array ({printable(str(exc))[:200]}); save it with numpy.save"
        ) from None
    if dtype.hasobject:
        raise InvalidInputError("the .npy array holds Python objects; send a float32 array")
    offset = stream.tell()
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(body) - offset:
        raise InvalidInputError(
            f"the .npy header declares shape {list(shape)} of {dtype} ({expected} bytes) but "
            f"{len(body) - offset} bytes follow it"
        )
    array = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")
