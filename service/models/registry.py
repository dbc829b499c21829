"""Every loaded model version, how requests reach one, and how versions come and go while serving.

A `LoadedModel` is whole or absent: it is published only once its session is created, checked and
warmed up, and it never changes after that. The registry routes each request to one (and holds a
lease on it for the request's lifetime); `sync` reconciles what is loaded with the repository and
the version policy, so a new version loads and warms off the request path while the old one serves,
then takes new requests at once; the old one is unpublished, finishes every request holding it
(leases, then its batcher's queue), and only then is released. A version that fails to load is
UNAVAILABLE with ONNX Runtime's reason, is not retried until its file changes, and never displaces a
serving version.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from modelcontract import complete_versions
from service.errors import BadRequestError, NotFoundError, ServiceUnavailableError, StartupError
from service.inference.predictor import Predictor
from service.metrics import Metrics
from service.models.repository import ModelLocation, check_model_name
from service.models.runtime import OnnxModel, check_gpu, load_model, return_freed_memory, warmup_sizes
from service.settings import Settings
from service.textsafety import printable

logger = logging.getLogger(__name__)


class VersionState(StrEnum):
    """Triton's model-repository states."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: int
    state: VersionState
    reason: str = ""


@dataclass(frozen=True)
class LoadedModel:
    """One served model version: everything a request needs, complete before anyone sees it."""

    location: ModelLocation
    model: OnnxModel
    predictor: Predictor
    load_seconds: float
    warmup_seconds: float

    @property
    def name(self) -> str:
        return self.location.name

    @property
    def version(self) -> int:
        return self.location.version


class ModelRegistry:
    """The served versions of every model, and the loads, swaps and unloads that change them."""

    def __init__(self, settings: Settings, metrics: Metrics, decode_executor: ThreadPoolExecutor) -> None:
        self._settings = settings
        self._metrics = metrics
        self._decode_executor = decode_executor
        self._policy = settings.policy
        self._served: dict[str, dict[int, LoadedModel]] = {}
        self._status: dict[tuple[str, int], VersionStatus] = {}
        self._failed: dict[tuple[str, int], tuple[float, int]] = {}
        """File signature (mtime, size) of versions that failed to load: retried when it changes."""
        self._leases: dict[tuple[str, int], int] = {}
        self._released: dict[tuple[str, int], asyncio.Event] = {}
        """Set when the last lease on a version being unloaded ends."""
        self._changes = asyncio.Lock()  # one reconciliation at a time
        self.required: set[str] = set()
        """Models that must have a ready version for the service to be ready: the start-up set, less
        models that left the repository. A model loaded later is served but not required, so its failure
        never makes the server unready; a required model unloaded on request makes it unready."""
        self.default_name: str | None = None
        """The model requests without a name go to: CONVSERVE_MODEL_NAME, or the only start-up model."""
        self.stopping = False

    # ---- routing --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return bool(self.required) and all(self._served.get(name) for name in self.required)

    def served(self) -> dict[str, list[int]]:
        return {name: sorted(versions) for name, versions in self._served.items() if versions}

    def resolve(self, name: str | None, version: int | None) -> LoadedModel:
        """The version a request asked for: default model, newest ready version, 400/404/503 otherwise.

        `name` comes from the client: it is only ever a key looked up here, never part of a path.
        """
        name = self._default_name() if name is None else check_model_name(name)
        versions = self._served.get(name, {})
        if version is not None and version in versions:
            return versions[version]
        if version is None and versions:
            return versions[max(versions)]
        known = [v for (n, v) in self._status if n == name]
        shown = printable(name, 80)
        if not known and name not in self.required:
            served = self.served()
            listing = f"served: {served}" if served else "no model is served at the moment (see /readyz)"
            raise NotFoundError(f"unknown model {shown!r}; {listing}")
        if not known:
            raise ServiceUnavailableError(f"model {shown!r} is loading; retry shortly (see /readyz)")
        if version is not None and version not in known:
            raise NotFoundError(f"model {shown!r} has no version {version}; served: {sorted(versions)}")
        status = self._status.get((name, version if version is not None else max(known)))
        reason = f" ({status.state}: {status.reason})" if status and status.reason else ""
        raise ServiceUnavailableError(
            f"model {shown!r} version {version or 'latest'} is not ready{reason}; retry shortly"
        )

    def _default_name(self) -> str:
        if self.default_name is not None:
            return self.default_name
        names = sorted(self.required | {name for name, versions in self._served.items() if versions})
        raise BadRequestError(
            f"this server has no default model (models: {names}); choose one with ?model=NAME, or set "
            "CONVSERVE_MODEL_NAME"
        )

    @contextmanager
    def lease(self, loaded: LoadedModel) -> Iterator[LoadedModel]:
        """Hold `loaded` for one request: it is not released while any request holds it."""
        key = (loaded.name, loaded.version)
        self._leases[key] = self._leases.get(key, 0) + 1
        try:
            yield loaded
        finally:
            self._leases[key] -= 1
            if not self._leases[key]:
                del self._leases[key]
                if key in self._released:
                    self._released[key].set()

    def expect(self, names: list[str]) -> None:
        """Models the service must serve before it is ready (the start-up set), and the default model.

        The default is fixed here, at start-up: a model loaded later never changes where requests
        without a model name go.
        """
        self.required.update(names)
        self.default_name = self._settings.model_name or (names[0] if len(names) == 1 else None)

    def index(self) -> list[VersionStatus]:
        return [self._status[key] for key in sorted(self._status)]

    # ---- reconciliation ---------------------------------------------------------------------------

    async def sync(self, names: list[str]) -> None:
        """Load and unload versions of `names` so they match the repository and the version policy."""
        async with self._changes:
            for name in names:
                await self._sync_model(name)

    async def unload(self, name: str) -> None:
        """Unload every version of `name` (explicit model control); a required model stays required."""
        async with self._changes:
            for version in sorted(self._served.get(name, {})):
                await self._unload(name, version, reason="unloaded on request")

    async def close(self) -> None:
        """Unload everything, each version after finishing its accepted work."""
        self.stopping = True
        async with self._changes:
            for name in list(self._served):
                for version in sorted(self._served[name]):
                    await self._unload(name, version, reason="server shut down")

    async def _sync_model(self, name: str) -> None:
        root = self._settings.model_repository
        on_disk = complete_versions(root / name)
        wanted = self._policy.select(on_disk)
        for version in wanted:
            if version not in self._served.get(name, {}) and not self._failed_unchanged(name, version):
                await self._load(ModelLocation(name, version))
            if self.stopping:
                return
        serving = self._served.get(name, {})
        if not on_disk:  # the model left the repository
            self.required.discard(name)
            stale = list(serving)
        elif any(version in serving for version in wanted):  # drop the rest only once a wanted one serves
            stale = [version for version in serving if version not in wanted]
        else:
            stale = []
        before = max(serving) if serving else None
        for version in sorted(stale):
            await self._unload(name, version, reason="no longer selected by the version policy")
        after = self._served.get(name) and max(self._served[name])
        if before is not None and after and after != before:
            logger.info("model %s: requests now go to version %d (was %d)", name, after, before)

    def _failed_unchanged(self, name: str, version: int) -> bool:
        signature = self._failed.get((name, version))
        return signature is not None and signature == _signature(
            ModelLocation(name, version).path(self._settings.model_repository)
        )

    async def _load(self, location: ModelLocation) -> None:
        name, version = location.name, location.version
        path = location.path(self._settings.model_repository)
        self._status[(name, version)] = VersionStatus(name, version, VersionState.LOADING)
        started = time.perf_counter()
        try:
            model = await asyncio.to_thread(
                load_model, path, self._settings.providers, self._settings.intra_op_threads
            )
            check_gpu(model, self._settings.require_gpu)
            warmup = await asyncio.to_thread(model.warmup, warmup_sizes(model, self._settings.max_batch_size))
        except Exception as exc:  # a bad file must never take the server down: report it, keep serving
            self._failed[(name, version)] = _signature(path)
            reason = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
            self._status[(name, version)] = VersionStatus(name, version, VersionState.UNAVAILABLE, reason)
            self._metrics.model_loads.labels(model=name, result="failure").inc()
            self._metrics.set_model_state(name, version, VersionState.UNAVAILABLE, "")
            logger.error(
                "model %s version %d failed to load after %.2f s: %s",
                name,
                version,
                time.perf_counter() - started,
                reason,
            )
            return
        self._failed.pop((name, version), None)
        predictor = await Predictor.start(
            model.metadata,
            model.run,
            self._settings,
            self._metrics.for_model(name, version),
            self._decode_executor,
            max_batch_size=model.batch_limit(self._settings.max_batch_size),
        )
        loaded = LoadedModel(location, model, predictor, time.perf_counter() - started, warmup)
        self._served = {**self._served, name: {**self._served.get(name, {}), version: loaded}}
        self._status[(name, version)] = VersionStatus(name, version, VersionState.READY)
        self._metrics.model_loads.labels(model=name, result="success").inc()
        self._metrics.model_load_duration.labels(model=name).observe(loaded.load_seconds)
        self._metrics.set_model_state(name, version, VersionState.READY, model.active_provider)
        logger.info(
            "model %s version %d loaded in %.2f s (warmup of batch sizes %s: %.2f s) on %s: input %s, "
            "%d classes, backbone %s",
            name,
            version,
            loaded.load_seconds,
            _sizes(warmup_sizes(model, self._settings.max_batch_size)),
            warmup,
            model.active_provider,
            list(model.metadata.input_shape),
            model.metadata.num_classes,
            model.metadata.backbone,
        )

    async def _unload(self, name: str, version: int, reason: str) -> None:
        loaded = self._served.get(name, {}).get(version)
        if loaded is None:
            return
        started = time.perf_counter()
        remaining = {v: m for v, m in self._served[name].items() if v != version}
        self._served = {**self._served, name: remaining}  # new requests no longer reach it
        self._status[(name, version)] = VersionStatus(name, version, VersionState.UNLOADING, reason)
        self._metrics.set_model_state(name, version, VersionState.UNLOADING, loaded.model.active_provider)
        drain_s = self._settings.request_timeout_s + self._settings.body_timeout_s
        if (name, version) in self._leases:
            released = self._released[(name, version)] = asyncio.Event()
            try:
                await asyncio.wait_for(released.wait(), drain_s)
            except TimeoutError:
                logger.error(
                    "model %s version %d still held by requests after %.0f s", name, version, drain_s
                )
            finally:
                del self._released[(name, version)]
        await loaded.predictor.close()
        del loaded
        gc.collect()  # the session (and its arena) goes with the last reference
        await asyncio.to_thread(return_freed_memory)
        self._status[(name, version)] = VersionStatus(name, version, VersionState.UNAVAILABLE, reason)
        self._metrics.forget_model(name, version)
        logger.info(
            "model %s version %d unloaded in %.2f s: %s", name, version, time.perf_counter() - started, reason
        )


def _signature(path: Path) -> tuple[float, int]:
    try:
        stat = path.stat()
    except OSError:
        return (0.0, -1)
    return (stat.st_mtime, stat.st_size)


def _sizes(sizes: tuple[int, ...]) -> str:
    return ",".join(map(str, sizes)) if len(sizes) <= 2 else f"{sizes[0]}-{sizes[-1]}"
