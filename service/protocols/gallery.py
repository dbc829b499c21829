"""The gallery API: labelled example images per model, added, listed and removed over HTTP.

    POST   /v1/models/{model}/gallery                 multipart: image files + one `label` field -> new ids
    GET    /v1/models/{model}/gallery                 labels with their counts, the answering version
    DELETE /v1/models/{model}/gallery/{label}         every entry of a label
    DELETE /v1/models/{model}/gallery/entries/{id}    one entry, by the id its add returned

Labels hold no `/` (`service.galleries.store.check_label`), so `/gallery/{label}` is one path segment
and `/gallery/entries/{id}` two: a label named `entries` is still reached by the first. Writes need the
admin token (`service.transport.access`); queries go through `/predict` (`mode=gallery`). Galleries
are off unless CONVSERVE_GALLERY_DIR is set: every route then answers 404 saying so.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.errors import InvalidInputError, UnsupportedMediaTypeError
from service.galleries.manager import GalleryManager
from service.galleries.store import MAX_LABEL_CHARS
from service.inference.predictor import NamedImage
from service.protocols.openapi import ErrorBody, errors, image_files
from service.state import service_state
from service.textsafety import printable
from service.transport.request_body import read_images_with_fields

router = APIRouter(prefix="/v1/models/{model_name}/gallery", tags=["galleries"])

LABEL_FIELD = "label"


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


_GALLERY_ERRORS: dict[int | str, dict[str, Any]] = {
    **errors(404, 503),
    403: _error("Gallery writes are off here (CONVSERVE_GALLERY_WRITES=false) or need an admin token."),
}
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_GALLERY_ERRORS,
    **errors(400, 408, 413, 415, 422, 504),
    409: _error("The model version cannot embed images (it has no embedding output)."),
    507: _error("The gallery is full: CONVSERVE_GALLERY_MAX_ENTRIES or CONVSERVE_GALLERY_MAX_BYTES."),
}

ADD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One or more image files (any field name) and one text field `label`.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": image_files("JPEG, PNG, WebP, BMP or GIF files: the label's examples."),
                        LABEL_FIELD: {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_LABEL_CHARS,
                            "description": f"What the images show: 1 to {MAX_LABEL_CHARS} printable "
                            "characters, no `/`.",
                        },
                    },
                    "required": ["file", LABEL_FIELD],
                }
            }
        },
    }
}


def galleries(request: Request) -> GalleryManager:
    return service_state(request).galleries


@router.post("", status_code=201, responses=_WRITE_ERRORS, openapi_extra=ADD_BODY)
async def add_examples(request: Request, model_name: str) -> JSONResponse:
    """Add the uploaded images to the model's gallery under `label`; the new entries' ids, in upload
    order. Embedded before anything is written: all are added, or none."""
    manager = galleries(request)
    manager.check_writable()
    await manager.store(model_name)  # 404 for an unknown model before the body is read
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"Content-Type {printable(media_type or '(none)')!r} is not accepted; send the images and the "
            "label as multipart/form-data, e.g. `curl -F label=cat -F image=@cat.jpg`"
        )
    state = service_state(request)
    files, fields = await read_images_with_fields(request, state.body_limits, state.settings.max_queue_size)
    labels = fields.get(LABEL_FIELD, [])
    if len(labels) != 1:
        raise InvalidInputError(
            f"expected exactly one `{LABEL_FIELD}` form field naming what the images show, got {len(labels)}"
        )
    images = [NamedImage(name, data) for name, data in files]
    ids = await manager.add(model_name, labels[0], images, request.state.arrived_at)
    return JSONResponse({"model": model_name, "label": labels[0], "ids": ids}, status_code=201)


@router.get("", responses=_GALLERY_ERRORS)
async def list_gallery(request: Request, model_name: str) -> JSONResponse:
    """The gallery's labels with their entry counts, the version that answers queries (null while
    none can), and how many entries each served version has still to embed."""
    listing = await galleries(request).listing(model_name)
    return JSONResponse(listing.body())


@router.delete("/entries/{entry_id}", status_code=204, response_class=Response, responses=_GALLERY_ERRORS)
async def remove_entry(request: Request, model_name: str, entry_id: str) -> Response:
    """Remove one entry by the id its add returned."""
    await galleries(request).remove_entry(model_name, entry_id)
    return Response(status_code=204)


@router.delete("/{label}", responses={**_GALLERY_ERRORS, **errors(422)})
async def remove_label(request: Request, model_name: str, label: str) -> JSONResponse:
    """Remove every entry of a label; how many there were."""
    removed = await galleries(request).remove_label(model_name, label)
    return JSONResponse({"model": model_name, "label": label, "removed": removed})
