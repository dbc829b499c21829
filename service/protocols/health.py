"""Liveness and readiness for orchestrators: `/healthz` and `/readyz`.

`/healthz` says the process serves HTTP: an orchestrator restarts the process when it fails.
`/readyz` says every required model (the start-up set) has a ready version: an orchestrator stops
sending traffic while it fails (loading, draining, or a required model unloaded through the repository
API) and resumes when it passes. A model loaded later is not required, so its failure to load never
makes the server unready.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.models.registry import VersionState
from service.protocols.openapi import errors
from service.state import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """200 while the process serves HTTP: a model that fails to load is reported, not fatal."""
    return JSONResponse({"status": "alive"})


@router.get("/readyz", responses=errors(503))
async def readyz(state: State) -> JSONResponse:
    """200 while every model the version policy requires has a ready version; 503 otherwise. Under
    CONVSERVE_MEMORY_BUDGET_MB a version that loads on demand (LOADABLE, EVICTED) counts as ready, and
    the body lists those and the memory in use."""
    registry = state.registry
    if not registry.ready:
        reasons = {
            status.name: f"{status.state}: {status.reason}" for status in registry.index() if status.reason
        }
        missing = sorted(name for name in registry.required if not registry.versions(name))
        detail = ", ".join(f"{name} ({reasons.get(name, 'loading')})" for name in missing) or "no model"
        return JSONResponse({"error": f"not ready: no ready version of {detail}"}, status_code=503)
    body: dict[str, Any] = {"status": "ready", "models": registry.served()}
    if state.settings.memory_budget_mb is not None:
        # Under a memory budget: what loads on the next request, and the memory in use.
        body["loadable"] = registry.in_state(VersionState.LOADABLE)
        body["evicted"] = registry.in_state(VersionState.EVICTED)
        body["memory"] = registry.memory()
    return JSONResponse(body)
