"""The V2 model-repository extension (Triton's names): index, load, unload.

`tritonclient.http`'s `get_model_repository_index`, `load_model` and `unload_model` work against it.
Load and unload are allowed with CONVSERVE_MODEL_CONTROL=explicit only, as in Triton: in `poll`
mode the repository on disk is the truth, and in `none` mode nothing changes after start-up.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from modelcontract import complete_versions
from service.errors import BadRequestError, NotFoundError
from service.openapi import errors
from service.repository import list_models
from service.state import ServiceState, State

router = APIRouter(prefix="/v2/repository", tags=["v2 model repository"])


@router.post("/index")
async def repository_index(state: State) -> JSONResponse:
    """Every model version in the repository or known to the server, with its state and a reason."""
    known = {(status.name, status.version): status for status in state.registry.index()}
    entries: list[dict[str, Any]] = [
        {"name": s.name, "version": str(s.version), "state": str(s.state), "reason": s.reason}
        for s in known.values()
    ]
    root = state.settings.model_repository
    for name in list_models(root):
        for version in complete_versions(root / name):
            if (name, version) not in known:
                entries.append(
                    {"name": name, "version": str(version), "state": "UNAVAILABLE", "reason": "not loaded"}
                )
    entries.sort(key=lambda entry: (entry["name"], int(entry["version"])))
    return JSONResponse(entries)


def _explicit_only(state: ServiceState, action: str) -> None:
    if state.settings.model_control != "explicit":
        raise BadRequestError(
            f"explicit model {action} is not allowed with CONVSERVE_MODEL_CONTROL="
            f"{state.settings.model_control}; set it to explicit"
        )


@router.post("/models/{model_name}/load", response_class=Response, responses=errors(400, 404))
async def load(state: State, model_name: str) -> Response:
    """Load (or reload) a model's versions per the version policy; 200 once one is ready."""
    _explicit_only(state, "load")
    if not complete_versions(state.settings.model_repository / model_name):
        raise NotFoundError(f"model {model_name!r} has no complete version in the repository")
    await state.registry.sync([model_name])
    if not state.registry.served().get(model_name):
        reasons = [s.reason for s in state.registry.index() if s.name == model_name and s.reason]
        raise BadRequestError(f"failed to load {model_name!r}: {'; '.join(reasons) or 'no version selected'}")
    return Response(status_code=200)


@router.post("/models/{model_name}/unload", response_class=Response, responses=errors(400))
async def unload(state: State, model_name: str) -> Response:
    """Unload every version of a model after it finishes the requests it has accepted."""
    _explicit_only(state, "unload")
    await state.registry.unload(model_name)
    return Response(status_code=200)
