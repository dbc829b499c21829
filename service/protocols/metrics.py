"""`/metrics` in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.protocols.openapi import METRICS_OPENAPI
from service.state import State

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=PlainTextResponse, openapi_extra=METRICS_OPENAPI)
async def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
