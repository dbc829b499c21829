"""The one place errors become HTTP responses: `{"error": "<what is wrong, what is expected>"}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.errors import InvalidInputError, ServiceError


def _count_rejection(request: Request, reason: str | None) -> None:
    if reason is not None:
        request.app.state.convserve.metrics.rejected.labels(reason=reason).inc()


async def handle_service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    _count_rejection(request, exc.reject_reason)
    request.state.error = exc.message  # goes into the request's single log line (repr: no raw controls)
    return JSONResponse({"error": exc.message}, status_code=exc.status_code, headers=exc.headers())


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own parameter validation (e.g. `top_k=abc`), in our error shape."""
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
        for error in exc.errors()
    )
    return await handle_service_error(request, InvalidInputError(f"invalid request parameters: {problems}"))


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    """Routing errors (unknown path 404, wrong method 405) in our error shape."""
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, handle_service_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(HTTPException, handle_http_exception)
    # No handler for bare `Exception`: Starlette runs that one outside every middleware and re-raises
    # after answering, which drops the request id and breaks the keep-alive connection.
    # RequestContextMiddleware turns unexpected exceptions into the JSON 500 instead.
