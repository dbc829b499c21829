"""The V2 model-repository extension (Triton's names): index, load, unload.

`tritonclient.http`'s `get_model_repository_index`, `load_model` and `unload_model` work against it.
Load and unload are allowed with CONVSERVE_MODEL_CONTROL=explicit only, as in Triton: in `poll`
mode the repository on disk is the truth, and in `none` mode nothing changes after start-up. Every
route here needs the admin token when one is set (`service.transport.access`). A model name from the URL is
looked up among the names the repository scan lists (and CONVSERVE_MODELS allows), never joined
into a path first, so `..` or a name outside the served set is a 4xx, not a load.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from modelcontract import complete_versions
from service.errors import BadRequestError, NotFoundError
from service.models.repository import check_model_name, list_models
from service.protocols.openapi import errors
from service.state import ServiceState, State
from service.textsafety import printable

router = APIRouter(prefix="/v2/repository", tags=["v2 model repository"])


@router.post("/index")
async def repository_index(state: State) -> JSONResponse:
    """Every model version in the repository or known to the server, with its state and a reason."""
    return JSONResponse(index_entries(state))


# The protocol-neutral part of each route, which the gRPC API (service.protocols.v2grpc_service) calls too.


def index_entries(state: ServiceState) -> list[dict[str, Any]]:
    """The repository index: `{"name", "version", "state", "reason"}` per version, sorted."""
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
    return entries


def _explicit_only(state: ServiceState, action: str) -> None:
    if state.settings.model_control != "explicit":
        raise BadRequestError(
            f"explicit model {action} is not allowed with CONVSERVE_MODEL_CONTROL="
            f"{state.settings.model_control}; set it to explicit"
        )


def _model_in_scope(state: ServiceState, model_name: str) -> str:
    """The repository model `model_name` names, if this server may serve it; 400/404 otherwise."""
    name = check_model_name(model_name)
    settings = state.settings
    if settings.models and name not in settings.models:
        raise NotFoundError(
            f"model {printable(name, 80)!r} is not one this server may serve (CONVSERVE_MODELS="
            f"{','.join(settings.models)})"
        )
    if name not in list_models(settings.model_repository):
        raise NotFoundError(
            f"model {printable(name, 80)!r} has no complete version in the repository "
            "(see POST /v2/repository/index)"
        )
    return name


@router.post("/models/{model_name}/load", response_class=Response, responses=errors(400, 404))
async def load(state: State, model_name: str) -> Response:
    """Load (or reload) a model's versions per the version policy; 200 once one is ready. Under a
    memory budget, idle versions of other models are unloaded to make room."""
    await load_model(state, model_name)
    return Response(status_code=200)


async def load_model(state: ServiceState, model_name: str) -> None:
    """Load (or reload) a model's versions; returns once one is ready, `ServiceError` saying why not."""
    _explicit_only(state, "load")
    name = _model_in_scope(state, model_name)
    await state.registry.sync([name], make_room=True)
    if not state.registry.served().get(name):
        reasons = [s.reason for s in state.registry.index() if s.name == name and s.reason]
        raise BadRequestError(f"failed to load {name!r}: {'; '.join(reasons) or 'no version selected'}")


@router.post("/models/{model_name}/unload", response_class=Response, responses=errors(400, 404))
async def unload(state: State, model_name: str) -> Response:
    """Unload every version of a model after it finishes the requests it has accepted.

    A model of the start-up set stays required: the server reports not ready (`/readyz` 503) until
    it is loaded again.
    """
    await unload_model(state, model_name)
    return Response(status_code=200)


async def unload_model(state: ServiceState, model_name: str) -> None:
    """Unload every version of a model once its accepted requests finish; `ServiceError` saying why not."""
    _explicit_only(state, "unload")
    name = check_model_name(model_name)
    if name not in state.registry.names() and name not in list_models(state.settings.model_repository):
        raise NotFoundError(f"model {printable(name, 80)!r} is neither served nor in the repository")
    await state.registry.unload(name)
