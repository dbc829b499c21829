"""KServe Open Inference Protocol (V2) endpoints, compatible with `tritonclient.http`.

Health answers are the status code alone (200 true, 400 false) with an empty body, as the protocol
says. Every served model version is reachable; without a version the newest ready one answers.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service import __version__
from service.inference.predictor import InferenceRequest, Inputs
from service.models.registry import LoadedModel
from service.protocols.openapi import INFERENCE_ERRORS, NO_CONTENT_HEALTH, V2_INFER_OPENAPI, errors
from service.protocols.v2codec import (
    HEADER_LENGTH,
    InferRequest,
    TensorSpec,
    encode_infer_response,
    parse_infer_request,
)
from service.state import State, model_lease, parse_version, path_model, service_state
from service.transport.request_body import content_coding, decode_content, read_body

router = APIRouter(prefix="/v2", tags=["v2"])
Model = Annotated[LoadedModel, Depends(path_model)]
MODEL = "/models/{model_name}"
VERSIONED = "/models/{model_name}/versions/{model_version}"
_INFER_ERRORS = {**INFERENCE_ERRORS, **errors(404)}


@router.get("")
async def server_metadata() -> JSONResponse:
    return JSONResponse(
        {
            "name": "convserve",
            "version": __version__,
            "extensions": ["binary_tensor_data", "classification", "model_repository"],
        }
    )


@router.get("/health/live", response_class=Response, responses=NO_CONTENT_HEALTH)
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", response_class=Response, responses=NO_CONTENT_HEALTH)
async def ready(state: State) -> Response:
    return Response(status_code=200 if state.registry.ready else 400)


@router.get(MODEL, responses=errors(404, 503))
@router.get(VERSIONED, responses=errors(404, 503))
async def model_metadata(state: State, loaded: Model) -> JSONResponse:
    meta = loaded.model.metadata
    body: dict[str, Any] = {
        "name": loaded.name,
        "versions": [str(v) for v in state.registry.served().get(loaded.name, [])],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": loaded.model.input_name, "datatype": "FP32", "shape": [-1, *meta.input_shape]}],
        "outputs": [{"name": loaded.model.output_name, "datatype": "FP32", "shape": [-1, meta.num_classes]}],
        "parameters": {
            "version": loaded.version,
            "execution_provider": loaded.model.active_provider,
            "max_batch_size": state.settings.max_batch_size,
            "backbone": meta.backbone,
            "val_accuracy": meta.val_accuracy,
            "created": meta.created,
        },
    }
    return JSONResponse(body)


@router.get(MODEL + "/config", responses=errors(404, 503))
@router.get(VERSIONED + "/config", responses=errors(404, 503))
async def model_config(state: State, loaded: Model) -> JSONResponse:
    """A minimal Triton model configuration, enough for perf_analyzer to benchmark this server."""
    meta, settings = loaded.model.metadata, state.settings
    return JSONResponse(
        {
            "name": loaded.name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": settings.max_batch_size,
            "version_policy": str(settings.policy),
            "input": [
                {"name": loaded.model.input_name, "data_type": "TYPE_FP32", "dims": list(meta.input_shape)}
            ],
            "output": [
                {"name": loaded.model.output_name, "data_type": "TYPE_FP32", "dims": [meta.num_classes]}
            ],
            "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000)},
        }
    )


@router.get(MODEL + "/ready", response_class=Response, responses={**NO_CONTENT_HEALTH, **errors(404)})
@router.get(VERSIONED + "/ready", response_class=Response, responses={**NO_CONTENT_HEALTH, **errors(404)})
async def model_ready(state: State, model_name: str, model_version: str | None = None) -> Response:
    version = parse_version(model_version)
    served = state.registry.served().get(model_name, [])
    if not served and not any(status.name == model_name for status in state.registry.index()):
        state.registry.resolve(model_name, version)  # raises the 404 naming what is served
    return Response(status_code=200 if (served and (version is None or version in served)) else 400)


@router.post(
    MODEL + "/infer", response_class=Response, responses=_INFER_ERRORS, openapi_extra=V2_INFER_OPENAPI
)
@router.post(
    VERSIONED + "/infer", response_class=Response, responses=_INFER_ERRORS, openapi_extra=V2_INFER_OPENAPI
)
async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    with model_lease(request, model_name, parse_version(model_version)) as loaded:
        state = service_state(request)
        meta = loaded.model.metadata
        spec = TensorSpec(
            input_name=loaded.model.input_name,
            input_shape=meta.input_shape,
            output_name=loaded.model.output_name,
            labels=meta.labels,
            max_rows=state.settings.max_queue_size,
        )
        limit = state.settings.max_upload_bytes
        header_length = request.headers.get(HEADER_LENGTH)

        async def receive() -> tuple[bytes, str | None]:
            coding = content_coding(request.headers)  # 415 before the body is read
            return await read_body(request, state.body_limits), coding

        def parse(payload: tuple[bytes, str | None]) -> tuple[Inputs, InferRequest]:
            body, coding = payload
            parsed = parse_infer_request(decode_content(body, coding, limit), header_length, spec)
            return Inputs(tensor=parsed.tensor, timeout_s=parsed.timeout_s), parsed

        logits, parsed = await loaded.predictor.run(
            InferenceRequest(request.state.arrived_at, receive, parse)
        )
    content, headers = encode_infer_response(
        model_name=loaded.name,
        model_version=str(loaded.version),
        request=parsed,
        logits=logits,
        labels=meta.labels,
    )
    return Response(content, headers=headers)
