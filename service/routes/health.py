"""Liveness and readiness for orchestrators: `/healthz` and `/readyz`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service.openapi import ErrorBody, errors
from service.state import ServiceState, get_state

router = APIRouter(tags=["health"])


@router.get("/healthz", responses={500: {"model": ErrorBody, "description": "Start-up failed for good."}})
async def healthz(state: Annotated[ServiceState, Depends(get_state)]) -> JSONResponse:
    """200 while the process can serve or is getting ready; 500 once startup failed for good."""
    if state.failure is not None:
        return JSONResponse({"error": f"the model failed to start: {state.failure}"}, status_code=500)
    return JSONResponse({"status": "alive"})


@router.get("/readyz", responses=errors(503))
async def readyz(state: Annotated[ServiceState, Depends(get_state)]) -> JSONResponse:
    """200 only after the model is loaded and warmed up; 503 before (and while shutting down)."""
    if not state.ready or state.model is None or state.location is None:
        reason = state.failure or "the model is loading or warming up"
        return JSONResponse({"error": f"not ready: {reason}"}, status_code=503)
    body: dict[str, Any] = {
        "status": "ready",
        "model": {"name": state.location.name, "version": state.location.version},
        "provider": state.model.active_provider,
    }
    return JSONResponse(body)
