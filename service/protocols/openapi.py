"""What the OpenAPI document says about bodies the routes read by hand and the errors they answer.

The routes parse their bodies themselves (multipart images, JSON or .npy tensors, V2 JSON or binary),
so FastAPI cannot infer them; these fragments describe them, so that generated clients and API
fuzzers know the real inputs, and every error status is documented with the one error shape.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error response: what was wrong and what is expected instead."""

    error: str = Field(description="What was wrong and what is expected instead.")


class ModelRef(BaseModel):
    name: str
    version: int


class Prediction(BaseModel):
    label: str
    index: int = Field(ge=0)
    score: float = Field(ge=0.0, le=1.0)


class PredictResponse(BaseModel):
    """Which model and version answered, and the top-k classes of each image, in upload order; with
    `embedding=true`, each image's embedding too."""

    model: ModelRef
    predictions: list[list[Prediction]]
    embeddings: list[list[float]] | None = Field(
        default=None,
        description="Only with `embedding=true`: one row per image (or tensor row), in the same order, "
        "of the model's `embedding_size` floats at unit length, so the dot product of two rows is their "
        "cosine similarity.",
    )
    neighbours: list[list[dict[str, Any]]] | None = Field(
        default=None,
        description="Only with `mode=gallery`: per image, the gallery's nearest examples, nearest first "
        '(`{"id", "label", "similarity"}`); `predictions` are then the gallery\'s labels by their vote.',
    )
    entries: int | None = Field(default=None, description="Only with `mode=gallery`: the examples searched.")
    gallery: dict[str, Any] | None = Field(
        default=None,
        description='Only with `mode=both`: the gallery\'s answer, `{"version", "entries", "predictions", '
        '"neighbours"}`, beside the classifier\'s `predictions`.',
    )


class Explanation(BaseModel):
    """One image's class activation map for one class, and where on the image it lies."""

    image: int = Field(ge=0, description="Position of the image in the request.")
    class_: Prediction = Field(alias="class", description="The class explained, with its score.")
    heatmap: list[list[float]] = Field(
        description="Rows x cols of values in [0, 1] (1: the strongest evidence) over the model's "
        "center crop, at most 56 a side."
    )
    box: list[float] = Field(
        min_length=4,
        max_length=4,
        description="[x0, y0, x1, y1]: the region of the image as sent, in its pixels, that the heatmap "
        "covers (the center crop mapped back through the resize).",
    )
    peak: list[float] = Field(
        min_length=2,
        max_length=2,
        description="[x, y]: where on the image as sent, in its pixels, the map is highest (placed between "
        "the map's cells).",
    )


class ExplainResponse(BaseModel):
    """Which model and version answered, and the explanations: image by image, and for each image
    its top-1 class, or each class asked for with `class=`, in the order asked."""

    model: ModelRef
    explanations: list[Explanation]


_MEANINGS = {
    400: "Malformed request: unparseable body, missing parts, bad parameters.",
    404: "No such model or version is served.",
    408: "The request body arrived too slowly (CONVSERVE_BODY_TIMEOUT_S, CONVSERVE_MIN_BODY_RATE).",
    413: "Body over CONVSERVE_MAX_UPLOAD_BYTES, or more images than CONVSERVE_MAX_QUEUE_SIZE.",
    415: "Content-Type or Content-Encoding not accepted.",
    422: "Well-formed but unusable: not a decodable image, wrong tensor shape or dtype, bad parameter.",
    503: "Not ready, shutting down, queue full or too many connections; see Retry-After when present.",
    504: "The deadline (CONVSERVE_REQUEST_TIMEOUT_S) passed before the request reached the model.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses, all with the `ErrorBody` shape."""
    return {status: {"model": ErrorBody, "description": _MEANINGS[status]} for status in statuses}


INFERENCE_ERRORS = errors(400, 408, 413, 415, 422, 503, 504)

_FLOAT_TENSOR = {
    "type": "array",
    "description": "Nested lists of numbers, shape [N, C, H, W], preprocessed as the model expects.",
    "items": {},
}


def image_files(description: str) -> dict[str, Any]:
    """The multipart `file` property of an image upload: one or more image files."""
    return {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "minItems": 1,
        "description": description,
    }


PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Images as multipart files (any field name, one or more), or a preprocessed "
        "float32 tensor [N, C, H, W] as JSON or as a .npy file.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": image_files("JPEG, PNG, WebP, BMP or GIF files.")},
                    "required": ["file"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"inputs": _FLOAT_TENSOR},
                    "required": ["inputs"],
                }
            },
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

EXPLAIN_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Images as multipart files (any field name, one or more; one with format=png).",
        "content": {"multipart/form-data": PREDICT_BODY["requestBody"]["content"]["multipart/form-data"]},
    }
}
PNG_RESPONSE: dict[str, Any] = {
    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    "description": "With format=png: the image, its size as sent (large JPEGs: their reduced decode "
    "size), with the heat map of the class blended over the crop box.",
}

_V2_TENSOR = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["FP32"]},
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        },
        "data": {"type": "array", "items": {}},
    },
    "required": ["name", "shape", "datatype"],
}
_V2_REQUEST = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_output": {"type": "boolean"},
                "timeout": {"type": "number", "description": "Deadline in microseconds."},
            },
        },
        "inputs": {"type": "array", "items": _V2_TENSOR, "minItems": 1, "maxItems": 1},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "binary_data": {"type": "boolean"},
                            "classification": {"type": "integer", "minimum": 0},
                        },
                    },
                },
                "required": ["name"],
            },
        },
    },
    "required": ["inputs"],
}
_V2_RESPONSE = {
    "type": "object",
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["model_name", "model_version", "outputs"],
}

V2_INFER_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "description": "Binary tensor extension: length of the JSON header that starts the body; "
            "the tensors' raw little-endian bytes follow it (0 = the body is one raw FP32 input).",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
    "requestBody": {
        "required": True,
        "description": "A KServe V2 inference request, as JSON or with Triton's binary tensor extension.",
        "content": {
            "application/json": {"schema": _V2_REQUEST},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {
            "description": "The outputs, as JSON or with binary tensors after the JSON header "
            "(then Inference-Header-Content-Length says where the header ends).",
            "content": {
                "application/json": {"schema": _V2_RESPONSE},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}

NO_CONTENT_HEALTH: dict[int | str, dict[str, Any]] = {
    200: {"description": "True. The body is empty, as the V2 protocol says."},
    400: {"description": "False. The body is empty, as the V2 protocol says."},
}

METRICS_OPENAPI: dict[str, Any] = {
    "responses": {"200": {"description": "Every metric in the Prometheus text exposition format."}}
}
