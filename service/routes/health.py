"""Liveness and readiness for orchestrators: `/healthz` and `/readyz`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.openapi import errors
from service.state import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """200 while the process serves HTTP: a model that fails to load is reported, not fatal."""
    return JSONResponse({"status": "alive"})


@router.get("/readyz", responses=errors(503))
async def readyz(state: State) -> JSONResponse:
    """200 while every model the version policy requires has a ready version; 503 otherwise."""
    registry = state.registry
    served = registry.served()
    if not registry.ready:
        missing = sorted(name for name in registry.required if not served.get(name)) or ["(loading)"]
        return JSONResponse({"error": f"not ready: no ready version of {missing}"}, status_code=503)
    body: dict[str, Any] = {
        "status": "ready",
        "models": {name: versions for name, versions in served.items()},
    }
    return JSONResponse(body)
