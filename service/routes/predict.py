"""`POST /predict`: images as multipart/form-data, or preprocessed tensors as JSON or .npy."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from service.errors import UnsupportedMediaTypeError
from service.openapi import INFERENCE_ERRORS, PREDICT_BODY, PredictResponse, errors
from service.registry import LoadedModel
from service.request_body import parse_json_tensor, parse_npy_tensor, read_body, read_images
from service.state import ServiceState, model_lease, service_state
from service.textsafety import printable

router = APIRouter(tags=["predict"])
DEFAULT_TOP_K = 5

_TENSOR_PARSERS: dict[str, Callable[[bytes], np.ndarray]] = {
    "application/json": parse_json_tensor,
    "application/x-npy": parse_npy_tensor,
}


async def _tensor(request: Request, state: ServiceState, parse: Callable[[bytes], np.ndarray]) -> np.ndarray:
    body = await read_body(request, state.body_limits)
    # A [32, 3, 224, 224] JSON body is ~5 million numbers: parse it off the event loop.
    return await asyncio.get_running_loop().run_in_executor(state.decode_executor, parse, body)


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
    top_k = predictor.check_top_k(
        min(DEFAULT_TOP_K, predictor.metadata.num_classes) if top_k is None else top_k
    )
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    arrived_at: float = request.state.arrived_at
    if media_type == "multipart/form-data":
        predictor.check_room()  # overloaded: refuse before reading the upload
        images = await read_images(request, state.body_limits, state.settings.max_queue_size)
        predictions = await predictor.classify_images(images, top_k, arrived_at)
    elif media_type in _TENSOR_PARSERS:
        predictor.check_room()
        tensor = await _tensor(request, state, _TENSOR_PARSERS[media_type])
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
