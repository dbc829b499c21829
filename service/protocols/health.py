"""Liveness and readiness for orchestrators: `/healthz` and `/readyz`.

`/healthz` says the process serves HTTP and can still serve: an orchestrator restarts the process
when it fails. It fails (503) only where waiting cannot help: with CONVSERVE_REQUIRE_GPU=true, when a
served version lost its GPU, or a required model was refused for want of one (the GPU probe's verdict
lasts as long as the process, so only a restart tries the device again). A model that fails to load
for any other reason is reported by `/readyz` and the repository index, not fatal.
`/readyz` says every required model (the start-up set) has a ready version: an orchestrator stops
sending traffic while it fails (loading, draining, or a required model unloaded through the repository
API) and resumes when it passes. A model loaded later is not required, so its failure to load never
makes the server unready.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.models.gpu import REQUIRE_GPU_REFUSAL
from service.models.registry import VersionState
from service.protocols.openapi import errors
from service.state import State

router = APIRouter(tags=["health"])


@router.get("/healthz", responses=errors(503))
async def healthz(state: State) -> JSONResponse:
    """200 while the process serves HTTP and can still serve; 503 once a GPU that
    CONVSERVE_REQUIRE_GPU requires has failed, so that the orchestrator restarts it."""
    failures = liveness_failures(state)
    if failures:
        return JSONResponse(
            {"error": f"not alive: {'; '.join(failures)}; restarting the process retries the GPU"},
            status_code=503,
        )
    return JSONResponse({"status": "alive"})


def liveness_failures(state: State) -> list[str]:
    """Why this process will never serve again until restarted, or [] while it can: served versions
    that lost their GPU, and required models refused for want of one. Both only happen under
    REQUIRE_GPU; without it the CPU takes over."""
    registry = state.registry
    failures = []
    for name, versions in registry.served().items():
        for version in versions:
            lost = registry.resolve(name, version).model.gpu_lost
            if lost is not None:
                failures.append(f"model {name} version {version}: {lost}")
    for status in registry.index():
        if (
            status.name in registry.required
            and not registry.versions(status.name)
            and status.state == VersionState.UNAVAILABLE
            and status.reason.startswith(REQUIRE_GPU_REFUSAL)
        ):
            failures.append(f"model {status.name} version {status.version}: {status.reason}")
    return failures


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
