"""`POST /predict`: images as multipart/form-data, or preprocessed tensors as JSON or .npy.

Cost of a request, in what it sends: multipart images are read and admitted by count
(CONVSERVE_MAX_QUEUE_SIZE) before any decoding; tensor bodies (optionally gzip/deflate, decoded off
the event loop within CONVSERVE_MAX_UPLOAD_BYTES) are parsed as `service.transport.request_body` describes.

Response budget: for R rows and `top_k` = k (at most the class count) the answer is at most
`response_bound(R, k, labels)` = 256 + R x (2 + k x (64 + digits of K + the longest escaped label))
bytes, plus the model's name. A request is refused (422, before inference) if that exceeds the
bytes of the float32 tensor it makes the server compute (R x C x H x W x 4) + 64 KiB.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from service.errors import InvalidInputError, UnsupportedMediaTypeError
from service.models.metadata import ModelMetadata
from service.models.registry import LoadedModel
from service.protocols.openapi import INFERENCE_ERRORS, PREDICT_BODY, PredictResponse, errors
from service.protocols.v2codec import RESPONSE_SLACK_BYTES, escaped_label_bytes
from service.state import ServiceState, model_lease, service_state
from service.textsafety import printable
from service.transport.request_body import (
    content_coding,
    decode_content,
    parse_json_tensor,
    parse_npy_tensor,
    read_body,
    read_images,
)

router = APIRouter(tags=["predict"])
DEFAULT_TOP_K = 5
TENSOR_TYPES = ("application/json", "application/x-npy")
_PREDICTION_BYTES = 64  # {"label":"","index":,"score":-1.2345678901234567e-05}, and a comma


def response_bound(rows: int, top_k: int, labels: tuple[str, ...]) -> int:
    """Most bytes of a `/predict` answer for `rows` rows and `top_k` classes each, the model name aside."""
    per_prediction = _PREDICTION_BYTES + len(str(len(labels))) + escaped_label_bytes(labels)
    return 256 + rows * (2 + top_k * per_prediction)


def _check_response_budget(rows: int, top_k: int, metadata: ModelMetadata) -> None:
    bound = response_bound(rows, top_k, metadata.labels)
    tensor_bytes = rows * math.prod(metadata.input_shape) * 4
    if bound > tensor_bytes + RESPONSE_SLACK_BYTES:
        raise InvalidInputError(
            f"top_k={top_k} for {rows} rows could take {bound} bytes, more than the request's "
            f"{tensor_bytes} tensor bytes + {RESPONSE_SLACK_BYTES}; ask for a smaller top_k"
        )


def _tensor_parser(media_type: str, loaded: LoadedModel, max_rows: int) -> Callable[[bytes], np.ndarray]:
    if media_type == "application/x-npy":
        return parse_npy_tensor
    row_shape = loaded.predictor.metadata.input_shape
    return functools.partial(parse_json_tensor, row_shape=row_shape, max_rows=max_rows)


async def _tensor(request: Request, state: ServiceState, parse: Callable[[bytes], np.ndarray]) -> np.ndarray:
    coding = content_coding(request.headers)  # 415 before the body is read
    body = await read_body(request, state.body_limits)
    limit = state.settings.max_upload_bytes

    def decode_and_parse() -> np.ndarray:  # tens of MB of JSON or gzip: never on the event loop
        return parse(decode_content(body, coding, limit))

    return await asyncio.get_running_loop().run_in_executor(state.decode_executor, decode_and_parse)


@router.post(
    "/predict",
    responses={200: {"model": PredictResponse}, **INFERENCE_ERRORS, **errors(404)},
    openapi_extra=PREDICT_BODY,
)
async def predict(
    request: Request,
    top_k: Annotated[
        int | None, Query(description="Classes to return per image, best first (default 5, or all if fewer).")
    ] = None,
    model: Annotated[
        str | None, Query(description="Model to use (default: CONVSERVE_MODEL_NAME or the only one).")
    ] = None,
    version: Annotated[
        int | None, Query(ge=1, description="Version to use (default: the newest ready one).")
    ] = None,
) -> JSONResponse:
    """Top-k labels for each image (or tensor row), in the order they were sent, and which model
    version computed them (`?model=NAME&version=V`, default: the default model's newest version)."""
    with model_lease(request, model, version) as loaded:
        return await _predict(request, service_state(request), loaded, top_k)


async def _predict(
    request: Request, state: ServiceState, loaded: LoadedModel, top_k: int | None
) -> JSONResponse:
    predictor = loaded.predictor
    metadata = predictor.metadata
    top_k = predictor.check_top_k(min(DEFAULT_TOP_K, metadata.num_classes) if top_k is None else top_k)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    arrived_at: float = request.state.arrived_at
    if media_type == "multipart/form-data":
        predictor.check_room()  # overloaded: refuse before reading the upload
        images = await read_images(request, state.body_limits, state.settings.max_queue_size)
        _check_response_budget(len(images), top_k, metadata)
        predictions = await predictor.classify_images(images, top_k, arrived_at)
    elif media_type in TENSOR_TYPES:
        predictor.check_room()
        parse = _tensor_parser(media_type, loaded, state.settings.max_queue_size)
        tensor = await _tensor(request, state, parse)
        if tensor.ndim == 4 and tensor.shape[1:] == metadata.input_shape:
            _check_response_budget(tensor.shape[0], top_k, metadata)  # else classify_tensor says why not
        predictions = await predictor.classify_tensor(tensor, top_k, arrived_at)
    else:
        raise UnsupportedMediaTypeError(
            f"Content-Type {printable(media_type or '(none)')!r} is not accepted; send images as "
            'multipart/form-data, or a preprocessed tensor as application/json {"inputs": [...]} or '
            "application/x-npy"
        )
    body: dict[str, Any] = {
        "model": {"name": loaded.name, "version": loaded.version},
        "predictions": predictions,
    }
    return JSONResponse(body)
