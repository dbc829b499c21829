"""`POST /predict`: images as multipart/form-data, or preprocessed tensors as JSON or .npy.

Cost of a request, in what it sends: multipart images are read and admitted by count
(CONVSERVE_MAX_QUEUE_SIZE) before any decoding; tensor bodies (optionally gzip/deflate, decoded off
the event loop within CONVSERVE_MAX_UPLOAD_BYTES) are parsed as `service.transport.request_body` describes.

With `?embedding=true` the answer also holds `"embeddings"`: one row of D floats per image (or tensor
row), in the same order, each of unit length (`ModelMetadata.unit_embeddings`), so that the dot
product of two rows is their cosine similarity. A model without an embedding output answers 422,
before the body is read.

Response budget: for R rows and `top_k` = k (at most the class count) the answer is at most
`response_bound(R, k, labels, D)` = 256 + R x (2 + k x (64 + digits of K + the longest escaped label))
bytes, plus R x (2 + D x 24) with embeddings (24: the most bytes JSON writes for one float32 value
and its comma), plus the model's name. A request is refused (422, before inference) if that exceeds
the bytes of the float32 tensor it makes the server compute (R x C x H x W x 4) + 64 KiB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from modelcontract import ModelMetadata
from service.errors import UnsupportedMediaTypeError
from service.galleries.store import MAX_LABEL_CHARS
from service.inference.predictor import InferenceRequest, Inputs, NamedImage
from service.protocols.openapi import INFERENCE_ERRORS, PREDICT_BODY, PredictResponse, errors
from service.protocols.v2codec import FLOAT_JSON_BYTES, check_answer_bound, escaped_label_bytes
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
_GALLERY_VOTE_BYTES = 96  # {"label":"","score":,"votes":,"similarity":} with two floats, and a comma
_NEIGHBOUR_BYTES = 96  # {"id":"<16 chars>","label":"","similarity":}, and a comma
Mode = Literal["classifier", "gallery", "both"]


def response_bound(
    rows: int, top_k: int, labels: tuple[str, ...], embedding_size: int = 0, gallery_k: int = 0
) -> int:
    """Most bytes of a `/predict` answer for `rows` rows and `top_k` classes each, with an embedding of
    `embedding_size` floats per row (0: none asked for) and a gallery's answer from its `gallery_k`
    nearest examples (0: none asked for), the model name aside."""
    per_prediction = _PREDICTION_BYTES + len(str(len(labels))) + escaped_label_bytes(labels)
    per_embedding = 2 + embedding_size * FLOAT_JSON_BYTES if embedding_size else 0
    # A gallery label is at most MAX_LABEL_CHARS printable characters, each at most 6 bytes escaped.
    gallery_label = 6 * MAX_LABEL_CHARS
    per_gallery = (
        4 + top_k * (_GALLERY_VOTE_BYTES + gallery_label) + gallery_k * (_NEIGHBOUR_BYTES + gallery_label)
        if gallery_k
        else 0
    )
    return 256 + rows * (2 + top_k * per_prediction + per_embedding + per_gallery)


def check_response_budget(
    rows: int, top_k: int, embedding_size: int, metadata: ModelMetadata, gallery_k: int = 0
) -> None:
    """422 (before inference) when the answer for `rows` rows could pass what the request may get back
    (`check_answer_bound`); `embedding_size` 0 when no embedding is asked for."""
    asked = f"top_k={top_k}" + (" and embedding=true" if embedding_size else "")
    check_answer_bound(
        response_bound(rows, top_k, metadata.labels, embedding_size, gallery_k),
        rows,
        math.prod(metadata.input_shape),
        asked=f"{asked} for {rows} rows",
        fix="ask for a smaller top_k" + (" or leave out the embeddings" if embedding_size else ""),
    )


@router.post(
    "/predict",
    responses={200: {"model": PredictResponse}, **INFERENCE_ERRORS, **errors(404)},
    openapi_extra=PREDICT_BODY,
)
async def predict(
    request: Request,
    *,
    top_k: Annotated[
        int | None, Query(description="Classes to return per image, best first (default 5, or all if fewer).")
    ] = None,
    model: Annotated[
        str | None, Query(description="Model to use (default: CONVSERVE_MODEL_NAME or the only one).")
    ] = None,
    version: Annotated[
        int | None, Query(ge=1, description="Version to use (default: the newest ready one).")
    ] = None,
    embedding: Annotated[
        bool,
        Query(
            description="Also answer each image's embedding (`embeddings`: unit-length rows, so a dot "
            "product is a cosine similarity); 422 for a model without one."
        ),
    ] = False,
    mode: Annotated[
        Mode,
        Query(
            description="`classifier`: the model's classes; `gallery`: the labels of the model's gallery by "
            "a vote of the nearest examples (`score`: share of the votes), with those examples under "
            "`neighbours`; `both`: the classes, and the gallery's answer under `gallery`."
        ),
    ] = "classifier",
) -> JSONResponse:
    """Top-k labels for each image (or tensor row), in the order they were sent, and which model
    version computed them (`?model=NAME&version=V`, default: the default model's newest version);
    with `?embedding=true`, each row's embedding too; with `?mode=gallery` or `both`, the answer of the
    model's gallery of labelled examples (docs/galleries.md)."""
    state = service_state(request)
    gallery_k = state.settings.gallery_k if mode != "classifier" else 0
    if gallery_k:  # the version whose embeddings answer the gallery (never another version's rows)
        version = await state.galleries.version_for(model, version)
    async with model_lease(request, model, version) as loaded:
        predictor = loaded.predictor
        metadata = predictor.metadata
        top_k = min(DEFAULT_TOP_K, metadata.num_classes) if top_k is None else top_k
        width = (metadata.embedding_size or 0) if embedding else 0
        inference = _inference_request(
            request, state, metadata, top_k, embedding_size=width, gallery_k=gallery_k
        )
        # A model without an embedding is refused (422) before the body is read.
        predictions, embeddings, _ = await predictor.classify(
            inference, top_k, embeddings=embedding or bool(gallery_k)
        )
    body: dict[str, Any] = {"model": {"name": loaded.name, "version": loaded.version}}
    if gallery_k:
        assert embeddings is not None
        answer = await state.galleries.classify(loaded.name, loaded.version, embeddings, top_k)
        if mode == "gallery":
            body.update(predictions=answer.predictions, neighbours=answer.neighbours, entries=answer.entries)
        else:
            body.update(predictions=predictions, gallery=answer.body())
    else:
        body["predictions"] = predictions
    if embedding and embeddings is not None:
        body["embeddings"] = embeddings.tolist()
    return JSONResponse(body)


def media_type_of(request: Request) -> str:
    """The request's Content-Type without its parameters, lower case ("" when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def multipart_images(
    request: Request, state: ServiceState, check_rows: Callable[[int], None]
) -> InferenceRequest[Any, list[NamedImage]]:
    """How the predictor receives images sent as multipart/form-data: every image endpoint's one way.

    At most CONVSERVE_MAX_QUEUE_SIZE files within the body limits; `check_rows(count)` refuses a
    request by its image count (its answer's budget) before any image is decoded. The files come back
    as what was parsed, for an answer that shows them.
    """

    async def receive_images() -> list[NamedImage]:
        files = await read_images(request, state.body_limits, state.settings.max_queue_size)
        return [NamedImage(name, data) for name, data in files]

    def images(files: list[NamedImage]) -> tuple[Inputs, list[NamedImage]]:
        check_rows(len(files))
        return Inputs(images=files), files

    # The multipart reader splits the files while they arrive: nothing is left to parse off the loop.
    return InferenceRequest(request.state.arrived_at, receive_images, images, parse_on_loop=True)


def _inference_request(
    request: Request,
    state: ServiceState,
    metadata: ModelMetadata,
    top_k: int,
    *,
    embedding_size: int,
    gallery_k: int = 0,
) -> InferenceRequest[Any, Any]:
    """How the predictor receives and parses this request's body, by its Content-Type."""
    media_type = media_type_of(request)
    arrived_at: float = request.state.arrived_at
    max_rows = state.settings.max_queue_size

    def check_rows(rows: int) -> None:
        check_response_budget(rows, top_k, embedding_size, metadata, gallery_k)

    if media_type == "multipart/form-data":
        return multipart_images(request, state, check_rows)
    if media_type in TENSOR_TYPES:
        limit = state.settings.max_upload_bytes

        async def receive_body() -> tuple[bytes, str | None]:
            coding = content_coding(request.headers)  # 415 before the body is read
            return await read_body(request, state.body_limits), coding

        def tensor(payload: tuple[bytes, str | None]) -> tuple[Inputs, None]:
            body, coding = payload
            decoded = decode_content(body, coding, limit)
            if media_type == "application/x-npy":
                array = parse_npy_tensor(decoded)
            else:
                array = parse_json_tensor(decoded, row_shape=metadata.input_shape, max_rows=max_rows)
            if array.ndim == 4 and array.shape[1:] == metadata.input_shape:
                check_rows(array.shape[0])  # else the predictor says why not
            return Inputs(tensor=array), None

        return InferenceRequest(arrived_at, receive_body, tensor)
    raise UnsupportedMediaTypeError(
        f"Content-Type {printable(media_type or '(none)')!r} is not accepted; send images as "
        'multipart/form-data, or a preprocessed tensor as application/json {"inputs": [...]} or '
        "application/x-npy"
    )
