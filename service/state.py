"""What the app holds at run time: settings, metrics, the model registry, the galleries and the shared
decode threads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service.galleries.manager import GalleryManager
from service.metrics import Metrics
from service.models import repository
from service.models.registry import LoadedModel, ModelRegistry
from service.models.threads import ThreadPlan
from service.priority import yield_to_the_event_loop
from service.settings import Settings
from service.transport.request_body import BodyLimits


@dataclass
class ServiceState:
    """Built with the app; models come and go inside `registry`, never as fields here."""

    settings: Settings
    metrics: Metrics
    threads: ThreadPlan = field(init=False)
    """How the CPU is shared: decode threads here, batches and ONNX Runtime threads in the registry."""
    decode_executor: ThreadPoolExecutor = field(init=False)
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the HTTP protocol when a graceful shutdown begins (see `service.transport.protocol`)."""
    registry: ModelRegistry = field(init=False)
    galleries: GalleryManager = field(init=False)
    """Every model's gallery (off unless CONVSERVE_GALLERY_DIR is set)."""

    def __post_init__(self) -> None:
        self.threads = ThreadPlan.from_settings(self.settings)
        self.decode_executor = ThreadPoolExecutor(
            self.threads.decode_threads,
            thread_name_prefix="convserve-decode",
            initializer=yield_to_the_event_loop,
        )
        self.registry = ModelRegistry(self.settings, self.metrics, self.decode_executor, self.threads)
        self.galleries = GalleryManager(self.settings, self.registry, self.metrics)

    @property
    def body_limits(self) -> BodyLimits:
        """How request bodies are read under these settings."""
        return BodyLimits(
            max_bytes=self.settings.max_upload_bytes,
            idle_timeout_s=self.settings.body_timeout_s,
            min_rate=self.settings.min_body_rate,
            draining=self.draining,
        )


def service_state(request: Request) -> ServiceState:
    """The app's `ServiceState`, for the inference routes, which skip FastAPI's dependency machinery."""
    state: ServiceState = request.app.state.convserve
    return state


async def get_state(request: Request) -> ServiceState:
    """FastAPI dependency: the app's `ServiceState` (async: a sync dependency costs a thread hop)."""
    return service_state(request)


State = Annotated[ServiceState, Depends(get_state)]


@asynccontextmanager
async def model_lease(request: Request, name: str | None, version: int | None) -> AsyncIterator[LoadedModel]:
    """The model version a request names (loaded on demand under a memory budget), held (never
    unloaded) until the block ends; 404 if the server has no such model.

    A context manager inside the route rather than a generator dependency: on the inference path
    FastAPI's exit-stack bookkeeping for one was ~7 % of the event loop's time per request.
    """

    def waited(seconds: float) -> None:  # the middleware answers it in `Server-Timing: load;dur=<ms>`
        request.state.model_load_s = seconds

    async with service_state(request).registry.acquire(name, version, waited) as loaded:
        request.state.model = (loaded.name, str(loaded.version))  # labels the request's metrics
        yield loaded


async def path_model(
    request: Request, model_name: str, model_version: str | None = None
) -> AsyncIterator[LoadedModel]:
    """FastAPI dependency for the V2 metadata routes: the model version named in the path."""
    async with model_lease(request, model_name, parse_version(model_version)) as loaded:
        yield loaded


def parse_version(text: str | None) -> int | None:
    """A V2 path's version: empty = the newest ready one; not a positive integer = 404."""
    return repository.parse_version(text) if text else None
