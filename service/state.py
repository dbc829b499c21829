"""What the app holds at run time: settings, metrics and, once loaded, the model and its predictor."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from service.batching import DynamicBatcher
from service.errors import ServiceUnavailableError
from service.metrics import Metrics
from service.predictor import Predictor
from service.repository import ModelLocation
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
