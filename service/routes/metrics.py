"""`/metrics` in the Prometheus text format."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.openapi import METRICS_OPENAPI
from service.state import ServiceState, get_state

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=PlainTextResponse, openapi_extra=METRICS_OPENAPI)
async def metrics(state: Annotated[ServiceState, Depends(get_state)]) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
