"""What the app holds at run time: settings, metrics and, once loaded, the model and its predictor."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from service.batching import DynamicBatcher
from service.errors import ServiceUnavailableError
from service.metrics import Metrics
from service.predictor import Predictor
from service.repository import ModelLocation
from service.request_body import BodyLimits
from service.runtime import OnnxModel
from service.settings import Settings


@dataclass
class ServiceState:
    """Filled in by the lifespan; routes read it through `get_state`."""

    settings: Settings
    metrics: Metrics
    location: ModelLocation | None = None
    model: OnnxModel | None = None
    batcher: DynamicBatcher | None = None
    predictor: Predictor | None = None
    decode_executor: ThreadPoolExecutor | None = None
    ready: bool = False
    """True once the model is loaded and every batch size has been warmed up."""
    failure: str | None = None
    """Why the service can never become ready (e.g. warmup failed); None while healthy."""
    warmup_seconds: float | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set at shutdown; an unfinished warmup stops at the next batch size."""
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the HTTP protocol when the server begins a graceful shutdown (see `service.protocol`)."""

    @property
    def body_limits(self) -> BodyLimits:
        """How request bodies are read under these settings."""
        return BodyLimits(
            max_bytes=self.settings.max_upload_bytes,
            idle_timeout_s=self.settings.body_timeout_s,
            min_rate=self.settings.min_body_rate,
            draining=self.draining,
        )

    def require_predictor(self) -> Predictor:
        """The predictor, or 503 while the model is loading or warming up."""
        if self.failure is not None:
            raise ServiceUnavailableError(f"the model failed to start: {self.failure}")
        if not self.ready or self.predictor is None:
            raise ServiceUnavailableError(
                "the model is still loading or warming up; retry shortly (see /readyz)"
            )
        return self.predictor


def get_state(request: Request) -> ServiceState:
    """FastAPI dependency: the app's `ServiceState`."""
    state: ServiceState = request.app.state.convserve
    return state
