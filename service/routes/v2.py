"""KServe Open Inference Protocol (V2) endpoints, compatible with `tritonclient.http`.

Health answers are the status code alone (200 true, 400 false) with an empty body, as the protocol
says. The server serves one model version; other names or versions get 404.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service import __version__
from service.errors import NotFoundError
from service.openapi import INFERENCE_ERRORS, NO_CONTENT_HEALTH, V2_INFER_OPENAPI, errors
from service.request_body import decode_content, read_body
from service.state import ServiceState, get_state
from service.v2 import HEADER_LENGTH, InferRequest, TensorSpec, encode_infer_response, parse_infer_request

router = APIRouter(prefix="/v2", tags=["v2"])
State = Annotated[ServiceState, Depends(get_state)]
MODEL = "/models/{model_name}"
VERSIONED = "/models/{model_name}/versions/{model_version}"


def _check_served(state: ServiceState, model_name: str, model_version: str | None) -> None:
    location = state.location
    if location is None:
        raise NotFoundError("no model is loaded yet; retry shortly")
    if model_name != location.name:
        raise NotFoundError(f"unknown model {model_name!r}; this server serves {location.name!r}")
    if model_version not in (None, "", str(location.version)):
        raise NotFoundError(
            f"version {model_version!r} of {location.name!r} is not loaded; this server serves version "
            f"{location.version} (available in the repository: {list(location.available_versions)})"
        )


@router.get("")
async def server_metadata() -> JSONResponse:
    return JSONResponse(
        {"name": "convserve", "version": __version__, "extensions": ["binary_tensor_data", "classification"]}
    )


@router.get("/health/live", response_class=Response, responses=NO_CONTENT_HEALTH)
async def live(state: State) -> Response:
    return Response(status_code=200 if state.failure is None else 400)


@router.get("/health/ready", response_class=Response, responses=NO_CONTENT_HEALTH)
async def ready(state: State) -> Response:
    return Response(status_code=200 if state.ready else 400)


@router.get(MODEL, responses=errors(404))
@router.get(VERSIONED, responses=errors(404))
async def model_metadata(state: State, model_name: str, model_version: str | None = None) -> JSONResponse:
    _check_served(state, model_name, model_version)
    assert state.location is not None and state.model is not None
    meta = state.model.metadata
    body: dict[str, Any] = {
        "name": state.location.name,
        "versions": [str(state.location.version)],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": state.model.input_name, "datatype": "FP32", "shape": [-1, *meta.input_shape]}],
        "outputs": [{"name": state.model.output_name, "datatype": "FP32", "shape": [-1, meta.num_classes]}],
        "parameters": {
            "execution_provider": state.model.active_provider,
            "max_batch_size": state.settings.max_batch_size,
            "backbone": meta.backbone,
            "val_accuracy": meta.val_accuracy,
            "created": meta.created,
        },
    }
    return JSONResponse(body)


@router.get(MODEL + "/config", responses=errors(404))
@router.get(VERSIONED + "/config", responses=errors(404))
async def model_config(state: State, model_name: str, model_version: str | None = None) -> JSONResponse:
    """A minimal Triton model configuration, enough for perf_analyzer to benchmark this server."""
    _check_served(state, model_name, model_version)
    assert state.model is not None
    meta, settings = state.model.metadata, state.settings
    return JSONResponse(
        {
            "name": model_name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": settings.max_batch_size,
            "input": [
                {"name": state.model.input_name, "data_type": "TYPE_FP32", "dims": list(meta.input_shape)}
            ],
            "output": [
                {"name": state.model.output_name, "data_type": "TYPE_FP32", "dims": [meta.num_classes]}
            ],
            "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000)},
        }
    )


@router.get(MODEL + "/ready", response_class=Response, responses={**NO_CONTENT_HEALTH, **errors(404)})
@router.get(VERSIONED + "/ready", response_class=Response, responses={**NO_CONTENT_HEALTH, **errors(404)})
async def model_ready(state: State, model_name: str, model_version: str | None = None) -> Response:
    _check_served(state, model_name, model_version)
    return Response(status_code=200 if state.ready else 400)


_INFER_ERRORS = {**INFERENCE_ERRORS, **errors(404)}


@router.post(
    MODEL + "/infer", response_class=Response, responses=_INFER_ERRORS, openapi_extra=V2_INFER_OPENAPI
)
@router.post(
    VERSIONED + "/infer", response_class=Response, responses=_INFER_ERRORS, openapi_extra=V2_INFER_OPENAPI
)
async def infer(
    request: Request, state: State, model_name: str, model_version: str | None = None
) -> Response:
    _check_served(state, model_name, model_version)
    predictor = state.require_predictor()
    assert state.model is not None and state.location is not None
    predictor.check_room()  # overloaded: refuse before reading the body
    limit = state.settings.max_upload_bytes
    body = await read_body(request, state.body_limits)
    spec = TensorSpec(state.model.input_name, state.model.metadata.input_shape, state.model.output_name)
    encoding, header_length = request.headers.get("content-encoding"), request.headers.get(HEADER_LENGTH)

    def parse() -> InferRequest:  # decompressing and parsing tens of MB must not block the event loop
        return parse_infer_request(decode_content(body, encoding, limit), header_length, spec)

    parsed = await asyncio.get_running_loop().run_in_executor(state.decode_executor, parse)
    tensor = predictor.check_tensor(parsed.tensor)
    logits = await predictor.infer(tensor, predictor.deadline(request.state.arrived_at, parsed.timeout_s))
    content, headers = encode_infer_response(
        model_name=state.location.name,
        model_version=str(state.location.version),
        request=parsed,
        logits=logits,
        labels=state.model.metadata.labels,
    )
    return Response(content, headers=headers)
