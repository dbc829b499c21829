"""Reading request bodies within bounds: raw bytes, multipart image files, JSON and .npy tensors.

Every body is read under `BodyLimits`: the size limit is checked against Content-Length before
reading and again while streaming (chunked bodies have no Content-Length); a body that stalls for
`idle_timeout_s`, or that averages under `min_rate` bytes/s after its first `idle_timeout_s`, gets
408; a body still arriving when the server starts draining gets 503 (it was never accepted). So a
slow or lying client holds a connection for a bounded time and never delays shutdown.

Content-Encoding is read by `content_coding` alone, for every body route: absent or `identity` is
none; `gzip` or `deflate`, applied once, for tensor bodies (JSON, .npy, V2); anything else (another
coding, a stack such as `gzip, gzip` or two header lines, an empty value, any coding on an image
upload) is a 415 saying what to send. `decode_content` undoes it with at most
CONVSERVE_MAX_UPLOAD_BYTES of output (413 beyond), so the limit bounds the decompressed body too,
and at most `MAX_INFLATION_RATIO` times the bytes sent (above `INFLATION_FLOOR_BYTES`): the work of a
compressed body stays proportional to what the client sent, where a 64 KiB gzip of zeros would
otherwise become 64 MiB to decompress, scan and parse. Real tensors compress 1-5 times (float text
or bytes); a body that compresses better is cheaper to send uncompressed than to refuse.

Cost model of a tensor body (B bytes after decoding, at most CONVSERVE_MAX_UPLOAD_BYTES):
- .npy: the header must match the bytes that follow; the array is a view of the body (0 copies).
- JSON: `service.transport.jsonparse` sets numeric arrays aside unparsed (at most 64 KiB of the rest is parsed
  into objects) and `service.transport.tensorjson` reads the shape of `inputs` from its brackets; only a
  [N, C, H, W] with 1 <= N <= CONVSERVE_MAX_QUEUE_SIZE is parsed, straight into float32. Peak
  memory: B + the float32 tensor + a few MiB (measured: 5-7 MiB at B = 64 MiB); time linear in B.
CPU-heavy work (decompressing, parsing) is done by the caller off the event loop.
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
from starlette.datastructures import Headers
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
from service.textsafety import printable
from service.transport.jsonparse import loads_bounded
from service.transport.multipart import read_files, read_form
from service.transport.tensorjson import nested_numbers

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


CODINGS = ("gzip", "deflate")


def content_coding(headers: Headers, *, images: bool = False) -> str | None:
    """The body's content coding: None (absent or identity), "gzip" or "deflate"; 415 otherwise.

    `images`: the body is a multipart upload of image files, which takes no coding at all.
    """
    lines = headers.getlist("content-encoding")
    codings = [coding.strip().lower() for line in lines for coding in line.split(",")]
    if codings in ([], ["identity"]):
        return None
    shown = printable(", ".join(lines))
    if "" in codings:
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {shown!r} has an empty coding; leave the header out or send gzip or deflate"
        )
    if images:
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {shown!r} on a multipart upload: images are already compressed, so "
            "send them without a Content-Encoding"
        )
    if len(codings) != 1:
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {shown!r} applies {len(codings)} codings; apply gzip or deflate once, "
            "in one header, or send the body as it is"
        )
    if codings[0] not in CODINGS:
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {shown!r} is not supported; use gzip or deflate, or leave the header out"
        )
    return codings[0]


MAX_INFLATION_RATIO = 32
"""Most bytes a compressed body may decompress to, per byte sent (above `INFLATION_FLOOR_BYTES`)."""
INFLATION_FLOOR_BYTES = 1 << 20
"""Any compressed body may decompress to this many bytes, whatever its ratio (cheap to handle)."""


def decode_content(body: bytes, coding: str | None, limit: int) -> bytes:
    """Undo `content_coding`'s coding, refusing output over `limit` bytes or `MAX_INFLATION_RATIO`
    times the body (zip bombs), truncated streams and bytes after the stream's end."""
    if coding is None:
        return body
    budget = min(limit, max(INFLATION_FLOOR_BYTES, MAX_INFLATION_RATIO * len(body)))
    decompressor = zlib.decompressobj(wbits=31 if coding == "gzip" else 15)
    try:
        data = decompressor.decompress(body, budget + 1)
    except zlib.error as exc:
        raise BadRequestError(f"the body is not valid {coding} data ({exc})") from None
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"the body decompresses to more than {limit} bytes (CONVSERVE_MAX_UPLOAD_BYTES); send less"
        )
    if len(data) > budget:
        raise PayloadTooLargeError(
            f"the {len(body)}-byte {coding} body decompresses to more than {MAX_INFLATION_RATIO} times its "
            "size; send it uncompressed (a body this compressible is mostly repeated values)"
        )
    if not decompressor.eof:
        raise BadRequestError(f"the {coding} body is truncated; send the whole compressed stream")
    if decompressor.unused_data:
        raise BadRequestError(
            f"{len(decompressor.unused_data)} bytes follow the end of the {coding} stream; compress the "
            "body once, as one stream"
        )
    return data


async def read_images(request: Request, limits: BodyLimits, max_files: int) -> list[tuple[str, bytes]]:
    """Every file part of a multipart/form-data body (any field name), in order, as (name, bytes).

    The name is the part's file name (else its field name), made safe to log and echo."""
    content_coding(request.headers, images=True)
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
    return [(printable(part.filename or part.field), part.data) for part in files]


async def read_images_with_fields(
    request: Request, limits: BodyLimits, max_files: int
) -> tuple[list[tuple[str, bytes]], dict[str, list[str]]]:
    """`read_images`, plus the body's text fields (each value at most `multipart.MAX_FIELD_BYTES`,
    at most 64 fields): for an upload that names what its images are, such as a gallery's label."""
    content_coding(request.headers, images=True)
    form = await read_form(
        _limited_stream(request, limits),
        request.headers.get("content-type", ""),
        max_files=max_files,
        max_fields=_MAX_FORM_FIELDS,
        keep_fields=True,
    )
    if not form.files:
        raise BadRequestError(
            "the multipart body holds no files; attach images as file fields, e.g. `curl -F image=@cat.jpg`"
        )
    files = [(printable(part.filename or part.field), part.data) for part in form.files]
    return files, form.fields


def parse_json_tensor(body: bytes, row_shape: tuple[int, ...], max_rows: int) -> np.ndarray:
    """`{"inputs": <nested list [N, *row_shape]>}` -> float32, 1 <= N <= max_rows; blocking for big bodies."""
    document = loads_bounded(body, "the body")
    payload = document.value
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequestError('expected a JSON object {"inputs": <nested list of shape [N, C, H, W]>}')
    lists_per_row = sum(math.prod(row_shape[:level]) for level in range(len(row_shape)))
    numbers = nested_numbers(payload["inputs"], '"inputs"', max_lists=1 + max_rows * lists_per_row)
    shape = numbers.shape
    if len(shape) != 1 + len(row_shape) or shape[1:] != row_shape or shape[0] < 1:
        expected = ", ".join(map(str, row_shape))
        raise InvalidInputError(f"expected a tensor of shape [N, {expected}] with N >= 1, got {list(shape)}")
    if shape[0] > max_rows:
        raise PayloadTooLargeError(
            f"the request carries {shape[0]} images but at most {max_rows} can be queued "
            "(CONVSERVE_MAX_QUEUE_SIZE); split it into smaller requests"
        )
    document.check_all_read(payload["inputs"])
    return numbers.read()


def parse_npy_tensor(body: bytes) -> np.ndarray:
    """A `.npy` file (no pickles) -> array, its declared size checked against the bytes sent first."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in _NPY_HEADER_READERS:
            raise ValueError(f"format version {version} is not supported; use numpy.save")
        read_header = _NPY_HEADER_READERS[version]
        shape, fortran_order, dtype = read_header(stream, max_header_size=_MAX_NPY_HEADER_BYTES)
    except (
        Exception
    ) as exc:  # numpy's header parser raises many kinds (tokenize.TokenError too) on hostile input
        raise InvalidInputError(
            f"the body is not a readable .npy array ({printable(str(exc))}); save it with numpy.save"
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
