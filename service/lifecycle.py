"""Start-up and shutdown: check the repository, load and warm every model, keep them in sync; drain.

The repository is checked before the server accepts traffic, so an empty or missing one refuses to
start. Loading and warmup run in the background: `/healthz` answers meanwhile and `/readyz` turns
200 once every model the version policy requires has a ready version. With MODEL_CONTROL=poll the
repository is then rescanned every REPOSITORY_POLL_S; with `explicit` the V2 repository API loads
and unloads; with `none` the start-up set stays.

The KServe V2 gRPC server (`service.protocols.v2grpc`, GRPC_PORT) runs on the same event loop; on
shutdown it drains before the model versions close, like HTTP requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI

from modelcontract import MODEL_FILENAME, complete_versions
from service.errors import StartupError
from service.metrics import forget_dead_workers, forget_worker
from service.models.gpu import GpuOptions
from service.models.repository import ModelLocation, list_models
from service.models.runtime import check_gpu, load_model
from service.protocols.v2grpc import GrpcApi
from service.settings import Settings
from service.state import ServiceState
from service.transport.protocol import LIMITS_STATE_KEY, ConnectionLimits

logger = logging.getLogger(__name__)


def models_in_scope(settings: Settings) -> list[str]:
    """The models to serve now: CONVSERVE_MODELS, or every model in the repository."""
    return list(settings.models) or list_models(settings.model_repository)


def check_repository(settings: Settings) -> list[str]:
    """The start-up set of models; `StartupError` saying how to fix an unusable repository."""
    root = settings.model_repository
    if not root.is_dir():
        raise StartupError(
            f"model repository {str(root)!r} does not exist; build a model with "
            f"`python -m training pretrained --out {root}/<name>` or set CONVSERVE_MODEL_REPOSITORY"
        )
    available = list_models(root)
    missing = [name for name in settings.models if name not in available]
    if missing:
        raise StartupError(
            f"CONVSERVE_MODELS names {missing}, not in repository {str(root)!r}; available: {available}"
        )
    names = models_in_scope(settings)
    if not names:
        raise StartupError(
            f"model repository {str(root)!r} holds no model (expected <name>/<version>/{MODEL_FILENAME}); "
            f"build one with `python -m training pretrained --out {root}/<name>`"
        )
    if settings.model_name is not None and settings.model_name not in names:
        raise StartupError(
            f"model {settings.model_name!r} (CONVSERVE_MODEL_NAME) is not in repository {str(root)!r}; "
            f"available: {names}"
        )
    return names


async def control(state: ServiceState, names: list[str]) -> None:
    """Load the start-up set, then keep the served versions in line with the repository (poll mode)."""
    registry, settings = state.registry, state.settings
    await registry.sync(names)
    logger.info(
        "serving %s; %s", registry.served(), "ready" if registry.ready else "NOT ready (see the index)"
    )
    if settings.model_control != "poll":
        return
    while True:
        await asyncio.sleep(settings.repository_poll_s)
        # Models that left the repository are synced too, so that they are unloaded.
        await registry.sync(sorted(set(models_in_scope(settings)) | registry.names()))


def probe_gpu(settings: Settings, name: str) -> None:
    """With REQUIRE_GPU, open one model's session now and refuse to start if it is not on a GPU."""
    location = ModelLocation(name, complete_versions(settings.model_repository / name)[-1])
    model = load_model(
        location.path(settings.model_repository), settings.providers, gpu=GpuOptions.from_settings(settings)
    )
    try:
        check_gpu(model, require_gpu=True)
    except StartupError as exc:
        logger.error("cannot start: %s", exc)
        raise


def connection_limits(state: ServiceState) -> ConnectionLimits:
    """The per-connection limits of `service.transport.protocol`, counted in `convserve_rejected_total`."""

    def count(reason: str) -> None:
        state.metrics.rejected.labels(reason="slow_client" if reason == "header_timeout" else reason).inc()

    return ConnectionLimits(
        header_timeout_s=state.settings.header_timeout_s,
        max_connections=state.settings.max_connections,
        max_header_bytes=state.settings.max_header_bytes,
        max_header_count=state.settings.max_header_count,
        draining=state.draining,
        on_refused=count,
    )


async def start_grpc(state: ServiceState) -> GrpcApi | None:
    """The gRPC server on GRPC_PORT, serving; None when GRPC_PORT=0."""
    if not state.settings.grpc_port:
        return None
    return await GrpcApi.start(state)


def lifespan_for(state: ServiceState) -> Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]]:
    """The FastAPI lifespan bound to `state`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        forget_dead_workers()
        try:
            names = check_repository(state.settings)
        except StartupError as exc:
            logger.error("cannot start: %s", exc)
            raise
        if state.settings.require_gpu:  # a deployment error: refuse to start rather than never be ready
            await asyncio.to_thread(probe_gpu, state.settings, names[0])
        state.registry.expect(names)
        if state.settings.workers > 1:
            # Workers share one listening socket: one that accepted connections while still loading
            # would answer 503 beside siblings that serve, so each starts accepting once it can serve.
            await state.registry.sync(names)
        try:
            grpc_api = await start_grpc(state)
        except StartupError as exc:
            logger.error("cannot start: %s", exc)
            raise
        controller = asyncio.create_task(control(state, names), name="convserve-model-control")
        state.galleries.start()
        try:
            # uvicorn hands the lifespan state to every connection's protocol (service.transport.protocol).
            yield {LIMITS_STATE_KEY: connection_limits(state)}
        finally:
            controller.cancel()
            with suppress(asyncio.CancelledError):
                await controller
            if grpc_api is not None:  # admitted RPCs finish before their model versions close
                await grpc_api.stop()
            await state.galleries.stop()  # its background embedding holds leases on model versions
            # Requests have finished by now (uvicorn waits for them first); each version then drains
            # its batcher, bounded by REQUEST_TIMEOUT_S.
            await state.registry.close()
            state.decode_executor.shutdown(wait=False, cancel_futures=True)
            forget_worker()
            logger.info("stopped")

    return lifespan
