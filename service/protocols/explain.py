"""`POST /v1/models/{model}:explain`: where the model looked, as class activation maps.

Images arrive as multipart/form-data exactly as for `/predict` (`predict.multipart_images`: the same
bounds, admission, deadlines and metrics; the metrics' `endpoint` label tells the two apart), and run
in the same batches as predictions (`Predictor.explain`). The answer, image by image:

    {"model": {"name", "version"},
     "explanations": [{"image": i, "class": {"label", "index", "score"},
                       "heatmap": [[...]], "box": [x0, y0, x1, y1], "peak": [x, y]}, ...]}

one entry per image for its top-1 class, or, with `?class=A&class=B` (or `?class=A,B`), one entry per
image per class asked for, image-major (image 0 class A, image 0 class B, image 1 class A, ...).
`heatmap` is rows x cols of values in [0, 1] over the model's center crop, at most 56 a side
(`service.protocols.heatmaps`); `box` is the region of the image as sent, in its pixels, that the
crop (and so the heatmap) covers, from the resize and crop in the model's metadata; `peak` is the
point of the image, in the same pixels, where the map is highest (`heatmaps.peak`: between cells, not
at one cell's corner). `?format=png`
answers one image as `image/png` instead: the photo, scaled down to at most four times the crop's
pixels (`heatmaps.fitted`), with the map blended over its box.

Cost of an answer, bounded before anything is decoded: at most `MAX_CLASSES` classes; for R images
and k classes, R x k x (cells x 8 + 384 + the longest escaped label) bytes must fit the bytes of the
float32 tensor the request makes the server compute plus 64 KiB (the `/predict` rule), else 422.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from modelcontract import ModelMetadata
from service.errors import InvalidInputError, UnsupportedMediaTypeError
from service.inference.predictor import ClassMap
from service.protocols import heatmaps
from service.protocols.openapi import EXPLAIN_BODY, INFERENCE_ERRORS, PNG_RESPONSE, ExplainResponse, errors
from service.protocols.predict import media_type_of, multipart_images
from service.protocols.v2codec import check_answer_bound, escaped_label_bytes
from service.state import model_lease, service_state
from service.textsafety import printable

router = APIRouter(tags=["explain"])
MAX_CLASSES = 16
"""Most classes one request may ask to explain."""
_ENTRY_BYTES = 384  # {"image":,"class":{"label":"","index":,"score":},"heatmap":[],"box":[4],"peak":[2]}
_CELL_BYTES = 8  # "0.1234," at GRID_DECIMALS decimals


def parse_classes(values: Sequence[str] | None) -> list[int] | None:
    """The class indices of `?class=` (repeated, or comma lists), in order, each once; None if absent."""
    if not values:
        return None
    parts = [part.strip() for value in values for part in value.split(",")]
    if len(parts) > MAX_CLASSES * 4:  # a long junk list is refused before it is looked at item by item
        raise InvalidInputError(f"at most {MAX_CLASSES} classes can be explained per request")
    try:
        indices = list(dict.fromkeys(int(part) for part in parts))
    except ValueError:
        shown = printable(",".join(values)[:80])
        raise InvalidInputError(
            f"class must be class indices (integers, repeated or comma-separated), got {shown!r}"
        ) from None
    if len(indices) > MAX_CLASSES:
        raise InvalidInputError(
            f"{len(indices)} classes asked for; at most {MAX_CLASSES} can be explained per request"
        )
    return indices


def answer_bound(rows: int, classes: int, metadata: ModelMetadata) -> int:
    """Most bytes of an explain answer for `rows` images and `classes` classes each, the model name aside."""
    cells = math.prod(heatmaps.grid_size(metadata.eval_spec.input_size))
    per_entry = (
        _ENTRY_BYTES
        + cells * _CELL_BYTES
        + len(str(metadata.num_classes))
        + escaped_label_bytes(metadata.labels)
    )
    return 256 + rows * classes * per_entry


def _check_rows(rows: int, classes: int, png: bool, metadata: ModelMetadata) -> None:
    if png and (rows != 1 or classes != 1):
        raise InvalidInputError(
            f"format=png draws one map over one image; this request has {rows} images and {classes} "
            "classes: send one image and at most one class, or ask for JSON"
        )
    check_answer_bound(
        answer_bound(rows, classes, metadata),
        rows,
        math.prod(metadata.input_shape),
        asked=f"{classes} classes for {rows} images",
        fix="ask for fewer classes or images",
    )


@router.post(
    "/v1/models/{model_name}:explain",
    responses={200: {"model": ExplainResponse, **PNG_RESPONSE}, **INFERENCE_ERRORS, **errors(404)},
    openapi_extra=EXPLAIN_BODY,
    response_model=None,
)
async def explain(
    request: Request,
    model_name: str,
    class_: Annotated[
        list[str] | None,
        Query(
            alias="class",
            description=f"Class indices to explain (repeat it or use commas; at most {MAX_CLASSES}); "
            "default: each image's top-1.",
        ),
    ] = None,
    format: Annotated[
        Literal["json", "png"],
        Query(description="json: heatmaps and boxes; png: one image with the heat map blended over it."),
    ] = "json",
    version: Annotated[
        int | None, Query(ge=1, description="Version to use (default: the newest ready one).")
    ] = None,
) -> Response:
    """Class activation maps of each image: where the model saw its top-1 class (or the classes asked
    for), over the model's center crop, and that crop's box in the image's own pixels."""
    classes = parse_classes(class_)
    png = format == "png"
    async with model_lease(request, model_name, version) as loaded:
        loaded.model.check_explainable()  # 422 naming why, before the body is read
        predictor = loaded.predictor
        metadata = predictor.metadata
        if classes is not None:
            predictor.check_classes(classes)
        media_type = media_type_of(request)
        if media_type != "multipart/form-data":
            raise UnsupportedMediaTypeError(
                f"Content-Type {printable(media_type or '(none)')!r} is not accepted; send images as "
                "multipart/form-data (explanations are drawn on the images, so tensors cannot be explained)"
            )
        count = 1 if classes is None else len(classes)
        inference = multipart_images(
            request, service_state(request), lambda rows: _check_rows(rows, count, png, metadata)
        )
        maps, files = await predictor.explain(inference, loaded.model.class_maps, classes)
        if png:
            photo = await predictor.photo(files[0], request.state.arrived_at)
            content = await predictor.offload(lambda: _overlay(photo, maps[0], metadata))
            return Response(content, media_type="image/png")
        entries = await predictor.offload(lambda: [_entry(m, metadata) for m in maps])
    body: dict[str, Any] = {
        "model": {"name": loaded.name, "version": loaded.version},
        "explanations": entries,
    }
    return JSONResponse(body)


def _box(item: ClassMap, metadata: ModelMetadata) -> tuple[float, float, float, float]:
    return metadata.eval_spec.crop_box(*item.size)


def _entry(item: ClassMap, metadata: ModelMetadata) -> dict[str, Any]:
    return {
        "image": item.image,
        "class": {"label": item.label, "index": item.index, "score": item.score},
        "heatmap": heatmaps.heatmap_grid(item.cam, metadata.eval_spec.input_size),
        "box": [round(value, 2) for value in _box(item, metadata)],
        "peak": [round(value, 2) for value in heatmaps.peak(item.cam, _box(item, metadata))],
    }


def _overlay(photo: Image.Image, item: ClassMap, metadata: ModelMetadata) -> bytes:
    # A large JPEG is decoded at reduced size: the box, in the pixels as sent, is scaled to the photo.
    scale_x, scale_y = photo.size[0] / item.size[0], photo.size[1] / item.size[1]
    x0, y0, x1, y1 = _box(item, metadata)
    box = (x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y)
    return heatmaps.overlay_png(photo, item.cam, box, overlay_pixels(metadata))


def overlay_pixels(metadata: ModelMetadata) -> int:
    """Most pixels of a PNG overlay for this model (`heatmaps.OVERLAY_PIXELS_PER_CROP_PIXEL`)."""
    height, width = metadata.eval_spec.input_size
    return heatmaps.OVERLAY_PIXELS_PER_CROP_PIXEL * height * width
