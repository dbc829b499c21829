"""Assembles the FastAPI app: state, lifespan, middleware, error handlers, routers."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry

from service import __version__
from service.lifecycle import lifespan_for
from service.metrics import Metrics
from service.protocols import explain, gallery, health, metrics, predict, repository, ui, v2
from service.protocols.docs import install_docs
from service.protocols.error_handlers import install_error_handlers
from service.settings import Settings
from service.state import ServiceState
from service.transport.access import AccessMiddleware, Credentials
from service.transport.body_budget import BodyBudget
from service.transport.middleware import RequestContextMiddleware

ROUTERS = (
    predict.router,
    explain.router,
    health.router,
    v2.router,
    repository.router,
    metrics.router,
    ui.router,
    gallery.router,
)
"""Every router of the service's own routes (FastAPI adds the docs routes)."""


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> FastAPI:
    """The service for `settings`; metrics go to `registry` (a fresh one by default)."""
    collectors = Metrics(registry or CollectorRegistry(), settings.max_batch_size)
    state = ServiceState(settings=settings, metrics=collectors)
    otel = settings.opentelemetry
    app = FastAPI(
        title="convserve",
        version=__version__,
        lifespan=lifespan_for(state),
        docs_url=None,  # service.protocols.docs serves the docs, with local assets
        redoc_url=None,
        telemetry={"tracing": otel, "metrics": otel, "logs": otel},
    )
    app.state.convserve = state
    install_error_handlers(app)
    # Added innermost first: RequestContext (ids, metrics, logs) sees every answer, CORS answers
    # preflights (which carry no token) before the access check, which runs before any route.
    app.add_middleware(
        AccessMiddleware,
        credentials=Credentials.from_settings(settings),
        allowed_origins=settings.cors_origins,
        on_refused=lambda reason: collectors.rejected.labels(reason=reason).inc(),
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "authorization",
                "content-type",
                "content-encoding",
                "inference-header-content-length",
                "x-request-id",
                *([settings.token_header] if settings.token_header else []),
            ],
            expose_headers=["x-request-id", "inference-header-content-length", "retry-after"],
            max_age=600,
        )
    budget = BodyBudget(settings.max_body_bytes_in_flight)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=collectors,
        budget=budget,
        error_delay_s=settings.client_error_delay_s,
    )
    for router in ROUTERS:
        app.include_router(router)
    install_docs(app)
    return app


def create_app_from_env() -> FastAPI:
    """Uvicorn factory for WORKERS > 1: each worker process reads the same CONVSERVE_* environment."""
    return create_app(Settings())
