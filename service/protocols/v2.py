"""KServe Open Inference Protocol (V2) endpoints, compatible with `tritonclient.http`.

Health answers are the status code alone (200 true, 400 false) with an empty body, as the protocol
says. Every served model version is reachable; without a version the newest ready one answers.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.inference.predictor import InferenceRequest, Inputs
from service.models.registry import LoadedModel
from service.protocols.openapi import INFERENCE_ERRORS, NO_CONTENT_HEALTH, V2_INFER_OPENAPI, errors
from service.protocols.v2codec import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_response,
    output_tensors,
    parse_infer_request,
)
from service.protocols.v2model import config_document, metadata_document, server_document, tensor_spec
from service.state import State, model_lease, parse_version, path_model, service_state
from service.transport.request_body import content_coding, decode_content, read_body

router = APIRouter(prefix="/v2", tags=["v2"])
Model = Annotated[LoadedModel, Depends(path_model)]
MODEL = "/models/{model_name}"
VERSIONED = "/models/{model_name}/versions/{model_version}"
_INFER_ERRORS = {**INFERENCE_ERRORS, **errors(404)}


@router.get("")
async def server_metadata() -> JSONResponse:
    return JSONResponse(server_document())


@router.get("/health/live", response_class=Response, responses=NO_CONTENT_HEALTH)
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", response_class=Response, responses=NO_CONTENT_HEALTH)
async def ready(state: State) -> Response:
    return Response(status_code=200 if state.registry.ready else 400)


@router.get(MODEL, responses=errors(404, 503))
@router.get(VERSIONED, responses=errors(404, 503))
async def model_metadata(state: State, loaded: Model) -> JSONResponse:
    return JSONResponse(metadata_document(state, loaded))


@router.get(MODEL + "/config", responses=errors(404, 503))
@router.get(VERSIONED + "/config", responses=errors(404, 503))
async def model_config(state: State, loaded: Model) -> JSONResponse:
    """A minimal Triton model configuration, enough for perf_analyzer to benchmark this server."""
    return JSONResponse(config_document(state, loaded))


@router.get(MODEL + "/ready", response_class=Response, responses={**NO_CONTENT_HEALTH, **errors(404)})
@router.get(VERSIONED + "/ready", response_class=Response, responses={**NO_CONTENT_HEALTH, **errors(404)})
async def model_ready(state: State, model_name: str, model_version: str | None = None) -> Response:
    ready = state.registry.model_ready(model_name, parse_version(model_version))
    return Response(status_code=200 if ready else 400)


@router.post(
    MODEL + "/infer", response_class=Response, responses=_INFER_ERRORS, openapi_extra=V2_INFER_OPENAPI
)
@router.post(
    VERSIONED + "/infer", response_class=Response, responses=_INFER_ERRORS, openapi_extra=V2_INFER_OPENAPI
)
async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    async with model_lease(request, model_name, parse_version(model_version)) as loaded:
        state = service_state(request)
        spec = tensor_spec(state, loaded)
        limit = state.settings.max_upload_bytes
        header_length = request.headers.get(HEADER_LENGTH)

        async def receive() -> tuple[bytes, str | None]:
            coding = content_coding(request.headers)  # 415 before the body is read
            return await read_body(request, state.body_limits), coding

        def parse(payload: tuple[bytes, str | None]) -> tuple[Inputs, InferRequest]:
            body, coding = payload
            parsed = parse_infer_request(decode_content(body, coding, limit), header_length, spec)
            return parsed.inputs, parsed

        computed, parsed = await loaded.predictor.run(
            InferenceRequest(request.state.arrived_at, receive, parse)
        )
    content, headers = encode_infer_response(
        model_name=loaded.name,
        model_version=str(loaded.version),
        request=parsed,
        outputs=output_tensors(parsed, computed, spec.labels),
    )
    return Response(content, headers=headers)
