"""A tiny real HTTP server for the harness tests: `python tiny_upload_server.py PORT`.

It speaks just enough of the service's interface for the load generator and the metrics reader:
`GET /readyz` and `/healthz`, `POST /predict` with multipart uploads (503 for files whose name starts with
`reject`, the way an overloaded server answers), and `GET /metrics` with a `convserve_batch_size`
histogram that records 2 per request, so the expected mean batch size is known exactly.
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from starlette.datastructures import UploadFile


def create_app() -> FastAPI:
    registry = CollectorRegistry()
    batch_size = Histogram("convserve_batch_size", "images per run", buckets=(1, 2, 4), registry=registry)
    app = FastAPI()

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        form = await request.form()
        uploads = [value for value in form.values() if isinstance(value, UploadFile)]
        if not uploads:
            return JSONResponse({"error": "no files"}, status_code=400)
        if any((upload.filename or "").startswith("reject") for upload in uploads):
            return JSONResponse({"error": "queue full"}, status_code=503)
        sizes = [len(await upload.read()) for upload in uploads]
        batch_size.observe(2)
        return JSONResponse({"predictions": [[{"label": "bytes", "index": 0, "score": s}] for s in sizes]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


if __name__ == "__main__":
    uvicorn.run(create_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
