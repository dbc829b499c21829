"""Reading request bodies within MAX_UPLOAD_BYTES: raw bytes, multipart image files, JSON and .npy tensors.

The limit is checked against Content-Length before reading and again while streaming (chunked
bodies have no Content-Length), so an oversized upload is refused without being held in memory.
Parsing that is CPU-heavy for big inputs (JSON tensors, .npy) is done by the caller off the loop.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.errors import BadRequestError, InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError
from service.predictor import NamedImage

_MAX_FORM_FIELDS = 64


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is larger than {limit} bytes (CONVSERVE_MAX_UPLOAD_BYTES); "
        "send fewer or smaller images"
    )


async def _limited_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes (413)."""
    return b"".join([chunk async for chunk in _limited_stream(request, limit)])


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a `Content-Encoding` of gzip or deflate, refusing output over `limit` bytes (zip bombs)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none"
        )
    decompressor = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequestError(f"the body is not valid {encoding} data ({exc})") from exc
    if len(data) > limit:
        raise _too_large(limit)
    return data


async def read_images(request: Request, limit: int, max_files: int) -> list[NamedImage]:
    """Every file part of a multipart/form-data body (any field name), in order."""
    parser = MultiPartParser(
        request.headers, _limited_stream(request, limit), max_files=max_files, max_fields=_MAX_FORM_FIELDS
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise PayloadTooLargeError(
                f"the request carries more than {max_files} images (CONVSERVE_MAX_QUEUE_SIZE); split it"
            ) from exc
        raise BadRequestError(
            f"malformed multipart body: {exc.message} (at most {max_files} files, CONVSERVE_MAX_QUEUE_SIZE)"
        ) from exc
    images: list[NamedImage] = []
    try:
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                images.append(NamedImage(value.filename or field, await value.read()))
    finally:
        await form.close()
    if not images:
        raise BadRequestError(
            "the multipart body holds no files; attach images as file fields, e.g. `curl -F image=@cat.jpg`"
        )
    return images


def parse_json_tensor(body: bytes) -> np.ndarray:
    """`{"inputs": <nested list [N, C, H, W]>}` -> float32 array; blocking for big bodies."""
    try:
        payload: Any = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the body is not valid JSON ({exc})") from exc
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequestError('expected a JSON object {"inputs": <nested list of shape [N, C, H, W]>}')
    try:
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused by the finiteness check
            return np.asarray(payload["inputs"], dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(
            f'"inputs" must be a rectangular nested list of numbers of shape [N, C, H, W] ({exc})'
        ) from exc


def parse_npy_tensor(body: bytes) -> np.ndarray:
    """A `.npy` file (no pickles) -> array; blocking for big bodies."""
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInputError(
            f"the body is not a readable .npy array ({exc}); save it with numpy.save"
        ) from exc
    if not isinstance(array, np.ndarray):
        raise InvalidInputError("the body must be a single .npy array, not an .npz archive")
    return array
