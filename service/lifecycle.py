"""Start-up and shutdown of the model: load, check, warm up, batch; then drain.

Loading happens before the server accepts traffic, so a bad repository or REQUIRE_GPU refuses to
start. Warmup runs in the background: `/healthz` answers meanwhile and `/readyz` turns 200 only
once every batch size the batcher can form has run once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.batching import DynamicBatcher
from service.errors import StartupError
from service.metrics import forget_dead_workers, forget_worker
from service.predictor import Predictor
from service.preprocessing import ImagePreprocessor
from service.protocol import LIMITS_STATE_KEY, ConnectionLimits
from service.repository import resolve_model
from service.runtime import OnnxModel, load_model
from service.state import ServiceState

logger = logging.getLogger(__name__)


def decode_threads() -> int:
    """Image decoding threads: one per core, at most 4 (ORT's own threads need cores too)."""
    return max(1, min(4, os.cpu_count() or 1))


def check_gpu(model: OnnxModel, require_gpu: bool) -> None:
    """Refuse to serve on CPU when a GPU was required, quoting why ONNX Runtime fell back."""
    if require_gpu and not model.on_gpu:
        raise StartupError(
            f"CONVSERVE_REQUIRE_GPU=true but ONNX Runtime is running on {model.active_provider}; "
            f"ONNX Runtime said: {model.provider_failure}"
        )


async def start(state: ServiceState) -> asyncio.Task[None]:
    """Load the model and start batching; returns the warmup task."""
    settings = state.settings
    forget_dead_workers()
    location = resolve_model(settings.model_repository, settings.model_name, settings.model_version)
    model = await asyncio.to_thread(load_model, location.path, settings.providers, settings.intra_op_threads)
    check_gpu(model, settings.require_gpu)
    if model.provider_failure:
        logger.warning(
            "%s is not active, running on %s; ONNX Runtime said: %s",
            settings.providers[0],
            model.active_provider,
            model.provider_failure,
        )
    state.location, state.model = location, model
    state.metrics.model_info.labels(
        name=location.name, version=str(location.version), provider=model.active_provider
    ).set(1)
    state.batcher = DynamicBatcher(
        model.run,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_s=settings.max_queue_delay_s,
        max_queue_size=settings.max_queue_size,
        metrics=state.metrics,
    )
    await state.batcher.start()
    state.decode_executor = ThreadPoolExecutor(decode_threads(), thread_name_prefix="convserve-decode")
    state.predictor = Predictor(
        metadata=model.metadata,
        preprocessor=ImagePreprocessor.from_metadata(
            model.metadata,
            max_pixels=settings.max_image_pixels,
            max_decoded_pixels=settings.max_decoded_pixels,
        ),
        batcher=state.batcher,
        metrics=state.metrics,
        decode_executor=state.decode_executor,
        request_timeout_s=settings.request_timeout_s,
    )
    logger.info(
        "loaded model %s version %d from %s on %s: input %s, %d classes, backbone %s",
        location.name,
        location.version,
        location.path,
        model.active_provider,
        list(model.metadata.input_shape),
        model.metadata.num_classes,
        model.metadata.backbone,
    )
    return asyncio.create_task(warm_up(state), name="convserve-warmup")


async def warm_up(state: ServiceState) -> None:
    """Run batch sizes 1..MAX_BATCH_SIZE once, then mark the service ready."""
    assert state.model is not None
    sizes = range(1, state.settings.max_batch_size + 1)
    try:
        state.warmup_seconds = await asyncio.to_thread(state.model.warmup, sizes, state.stopping)
    except Exception as exc:
        state.failure = f"warmup failed: {type(exc).__name__}: {exc}"
        logger.error("%s; the service will not become ready", state.failure)
        return
    if state.stopping.is_set():
        return
    state.ready = True
    logger.info(
        "warmed up batch sizes 1-%d in %.2f s; ready", state.settings.max_batch_size, state.warmup_seconds
    )


async def stop(state: ServiceState, warmup: asyncio.Task[None] | None) -> None:
    """Stop taking work, finish what was accepted (bounded by REQUEST_TIMEOUT_S), release threads."""
    state.ready = False
    state.stopping.set()
    if warmup is not None:
        await warmup  # returns after the batch size being run, at most one session.run away
    if state.batcher is not None:
        # Every queued request's deadline is at most REQUEST_TIMEOUT_S away, which bounds the drain.
        await state.batcher.close(timeout_s=state.settings.request_timeout_s)
    if state.decode_executor is not None:
        state.decode_executor.shutdown(wait=False, cancel_futures=True)
    forget_worker()
    logger.info("stopped")


def connection_limits(state: ServiceState) -> ConnectionLimits:
    """The limits `service.protocol` enforces per connection, counted in `convserve_rejected_total`."""

    def count(reason: str) -> None:
        state.metrics.rejected.labels(reason="slow_client" if reason == "header_timeout" else reason).inc()

    return ConnectionLimits(
        header_timeout_s=state.settings.header_timeout_s,
        max_connections=state.settings.max_connections,
        draining=state.draining,
        on_refused=count,
    )


def lifespan_for(state: ServiceState) -> Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]]:
    """The FastAPI lifespan bound to `state`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        try:
            warmup = await start(state)
        except StartupError as exc:
            logger.error("cannot start: %s", exc)
            raise
        try:
            # uvicorn hands the lifespan state to every connection's protocol (service.protocol).
            yield {LIMITS_STATE_KEY: connection_limits(state)}
        finally:
            await stop(state, warmup)

    return lifespan
