"""Every model version the server serves, how requests reach one, and how versions come and go.

A `LoadedModel` is whole or absent: it is published only once its session is created, checked and
warmed up, and it never changes after that. The registry routes each request to one and holds a
lease on that version for the request's lifetime; `sync` reconciles what is loaded with the
repository and the version policy, so a new version loads and warms off the request path while the
old one serves, then takes new requests at once; the old one is unpublished, finishes every request
holding it (leases, then its batcher's queue), and only then is released. A version that fails to
load is UNAVAILABLE with ONNX Runtime's reason, is not retried until its file changes, and never
displaces a serving version.

With MEMORY_BUDGET_MB (`service.models.memory`) the versions the policy selects need not all be
loaded at once: what does not fit is LOADABLE, and a version unloaded to make room is EVICTED. A
request for either holds its lease first (so nothing can evict the version between its load and the
request), then waits, within REQUEST_TIMEOUT_S, for one load that every request for that version
shares. Room is made by unloading the least recently used versions that no request holds; when every
loaded version is in use, the load waits for one to go idle. A version bigger than the whole budget
is refused with 507 and never loaded again until its file changes.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NoReturn

from modelcontract import complete_versions
from service.errors import (
    BadRequestError,
    InsufficientStorageError,
    NotFoundError,
    ServiceUnavailableError,
    StartupError,
)
from service.inference.predictor import Predictor
from service.metrics import Metrics
from service.models.gpu import GpuOptions
from service.models.memory import MIB, Key, MemoryBudget, measured
from service.models.repository import ModelLocation, check_model_name
from service.models.runtime import OnnxModel, check_gpu, load_model, return_freed_memory, warmup_sizes
from service.models.threads import ThreadPlan
from service.settings import Settings
from service.textsafety import printable

logger = logging.getLogger(__name__)


class VersionState(StrEnum):
    """Triton's model-repository states, and the two of a memory budget."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"
    LOADABLE = "LOADABLE"
    """Selected by the version policy, not loaded yet for want of room: the first request loads it."""
    EVICTED = "EVICTED"
    """Unloaded to make room within the memory budget: the next request loads it again."""


ON_DEMAND = frozenset({VersionState.LOADABLE, VersionState.EVICTED})


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
    memory_bytes: int
    """What loading it added to the process's resident memory (at least its file's size)."""

    @property
    def name(self) -> str:
        return self.location.name

    @property
    def version(self) -> int:
        return self.location.version


class ModelRegistry:
    """The served versions of every model, and the loads, swaps, evictions and unloads that change them."""

    def __init__(
        self, settings: Settings, metrics: Metrics, decode_executor: ThreadPoolExecutor, threads: ThreadPlan
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._decode_executor = decode_executor
        self._policy = settings.policy
        self._served: dict[str, dict[int, LoadedModel]] = {}
        self._waiting: dict[str, frozenset[int]] = {}
        """Versions requests load on demand (LOADABLE, EVICTED, or on their way from or to one), by
        model: kept with `_status` by `_set_status`."""
        self._status: dict[Key, VersionStatus] = {}
        self._failed: dict[Key, tuple[float, int]] = {}
        """File signature (mtime, size) of versions that failed to load: retried when it changes."""
        self._too_large: set[Key] = set()
        """Versions that need more than the whole memory budget (a subset of `_failed`)."""
        self._leases: dict[Key, int] = {}
        self._released: dict[Key, asyncio.Event] = {}
        """Set when the last lease on a version being unloaded ends."""
        self._idle = asyncio.Event()
        """Set whenever a version's last lease ends: a load waiting for room looks again."""
        self._pending: dict[Key, asyncio.Task[None]] = {}
        """On-demand loads in progress: every request for the version awaits the same one."""
        self._budget = MemoryBudget(settings.memory_budget_bytes)
        self._threads = threads
        logger.info("on the CPU: %s", threads.describe())
        self._changes = asyncio.Lock()  # one reconciliation at a time
        self.required: set[str] = set()
        """Models that must have a servable version for the service to be ready: the start-up set, less
        models that left the repository. A model loaded later is served but not required, so its failure
        never makes the server unready; a required model unloaded on request makes it unready."""
        self.default_name: str | None = None
        """The model requests without a name go to: CONVSERVE_MODEL_NAME, or the only start-up model."""
        self.stopping = False
        if self._budget.limit_bytes is not None:
            self._metrics.memory_budget.set(self._budget.limit_bytes)

    # ---- routing --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return bool(self.required) and all(self.versions(name) for name in self.required)

    def served(self) -> dict[str, list[int]]:
        """The loaded versions of every model."""
        return {name: sorted(versions) for name, versions in self._served.items() if versions}

    def in_state(self, state: VersionState) -> dict[str, list[int]]:
        """The versions of every model in `state` (e.g. LOADABLE, EVICTED)."""
        found: dict[str, list[int]] = {}
        for (name, version), status in sorted(self._status.items()):
            if status.state == state:
                found.setdefault(name, []).append(version)
        return found

    def versions(self, name: str) -> list[int]:
        """The versions of `name` a request can reach: loaded, or loaded on demand."""
        return sorted(self._served.get(name, {}).keys() | self._waiting.get(name, frozenset()))

    def names(self) -> set[str]:
        """Models with a loaded or an on-demand version."""
        return {name for name in self._served.keys() | self._waiting.keys() if self.versions(name)}

    def memory(self) -> dict[str, int | None]:
        """The memory budget and what loaded versions use of it, in MiB."""
        return self._budget.describe()

    def model_ready(self, name: str, version: int | None) -> bool:
        """Whether requests for `name` (and `version`) are served now or on demand; 404 for a model the
        server knows nothing of (the error names what is served)."""
        name = check_model_name(name)
        versions = self.versions(name)
        if not versions and not any(known == name for known, _ in self._status):
            self._locate(name, version)  # raises the 404
        return bool(versions) and (version is None or version in versions)

    def resolve(self, name: str | None, version: int | None) -> LoadedModel:
        """The loaded version a request asks for; 503 when it must be loaded first (see `acquire`)."""
        found = self._locate(name, version)
        if isinstance(found, LoadedModel):
            return found
        raise ServiceUnavailableError(f"model {printable(found[0], 80)!r} version {found[1]} is not loaded")

    @asynccontextmanager
    async def acquire(
        self, name: str | None, version: int | None, waited: Callable[[float], None] | None = None
    ) -> AsyncIterator[LoadedModel]:
        """The version a request asks for, loaded on demand if need be, and held until the block ends;
        `waited(seconds)` is told how long the request waited for an on-demand load, if it did.

        `name` comes from the client: it is only ever a key looked up here, never part of a path.
        """
        found = self._locate(name, version)
        if isinstance(found, LoadedModel):
            with self._holding((found.name, found.version)):
                yield found
            return
        with self._holding(found):
            started = time.perf_counter()
            loaded = await self._load_on_demand(found)
            if waited is not None:
                waited(time.perf_counter() - started)
            yield loaded

    @contextmanager
    def lease(self, loaded: LoadedModel) -> Iterator[LoadedModel]:
        """Hold `loaded` for one request: it is not released while any request holds it."""
        with self._holding((loaded.name, loaded.version)):
            yield loaded

    @contextmanager
    def _holding(self, key: Key) -> Iterator[None]:
        self._leases[key] = self._leases.get(key, 0) + 1
        self._budget.touch(key)
        try:
            yield
        finally:
            self._leases[key] -= 1
            if not self._leases[key]:
                del self._leases[key]
                self._idle.set()
                if key in self._released:
                    self._released[key].set()

    def _locate(self, name: str | None, version: int | None) -> LoadedModel | Key:
        """The loaded version a request asks for, or the key of one to load on demand; 4xx/5xx otherwise."""
        name = self._default_name() if name is None else check_model_name(name)
        versions = self._served.get(name, {})
        waiting = self._waiting.get(name, frozenset())
        if version is None:
            newest = max((*versions, *waiting), default=None)
            if newest is not None:
                return versions.get(newest) or (name, newest)
        elif version in versions:
            return versions[version]
        elif version in waiting:
            return (name, version)
        known = [v for (n, v) in self._status if n == name]
        shown = printable(name, 80)
        if not known and name not in self.required:
            served = self.served()
            listing = f"served: {served}" if served else "no model is served at the moment (see /readyz)"
            raise NotFoundError(f"unknown model {shown!r}; {listing}")
        if not known:
            raise ServiceUnavailableError(f"model {shown!r} is loading; retry shortly (see /readyz)")
        if version is not None and version not in known:
            raise NotFoundError(f"model {shown!r} has no version {version}; served: {self.versions(name)}")
        key = (name, version if version is not None else max(known))
        self._raise_unavailable(key)

    def _raise_unavailable(self, key: Key) -> NoReturn:
        status = self._status.get(key)
        reason = f" ({status.state}: {status.reason})" if status and status.reason else ""
        message = f"model {printable(key[0], 80)!r} version {key[1]} is not ready{reason}"
        if key in self._too_large:
            raise InsufficientStorageError(message)
        raise ServiceUnavailableError(f"{message}; retry shortly")

    def _default_name(self) -> str:
        if self.default_name is not None:
            return self.default_name
        names = sorted(self.required | self.names())
        raise BadRequestError(
            f"this server has no default model (models: {names}); choose one with ?model=NAME, or set "
            "CONVSERVE_MODEL_NAME"
        )

    def expect(self, names: list[str]) -> None:
        """Models the service must serve before it is ready (the start-up set), and the default model.

        The default is fixed here, at start-up: a model loaded later never changes where requests
        without a model name go.
        """
        self.required.update(names)
        self.default_name = self._settings.model_name or (names[0] if len(names) == 1 else None)

    def index(self) -> list[VersionStatus]:
        return [self._status[key] for key in sorted(self._status)]

    # ---- loading on demand --------------------------------------------------------------------------

    async def _load_on_demand(self, key: Key) -> LoadedModel:
        """`key` loaded by the one load all its requests share, waited for within REQUEST_TIMEOUT_S."""
        task = self._pending.get(key)
        if task is None:
            task = asyncio.create_task(self._load_for_requests(key), name=f"convserve-load-{key[0]}-{key[1]}")
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        timeout_s = self._settings.request_timeout_s
        try:
            # shielded: a request that gives up does not cancel the load the others (and retries) await
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            raise ServiceUnavailableError(
                f"model {printable(key[0], 80)!r} version {key[1]} is being loaded on demand and was not "
                f"ready within {timeout_s:g} s (REQUEST_TIMEOUT_S); retry shortly"
            ) from None
        loaded = self._served.get(key[0], {}).get(key[1])
        if loaded is None:
            self._raise_unavailable(key)
        return loaded

    async def _load_for_requests(self, key: Key) -> None:
        async with self._changes:
            if self.stopping or key[1] not in self._waiting.get(key[0], frozenset()):
                return  # loaded meanwhile by a sync, or no longer selected: the requests look again
            location = ModelLocation(*key)
            if await self._make_room(location, wait_s=self._settings.request_timeout_s):
                # On the CPU a session's first batches run no slower than later ones (the arena is
                # shared and already grown), so the requests waiting here skip the warmup; a GPU
                # still warms, since it picks kernels per shape.
                await self._load(location, warm=False)

    async def _make_room(self, location: ModelLocation, wait_s: float) -> bool:
        """Unload idle versions, least recently used first, until `location` fits the budget; False
        (with the reason in its status) when it cannot fit within `wait_s` or ever."""
        key = (location.name, location.version)
        need = self._budget.need(key, location.path(self._settings.model_repository))
        if self._budget.exceeds_limit(need):
            self._refuse_too_large(location, need)
            return False
        deadline = asyncio.get_running_loop().time() + wait_s
        while not self._budget.fits(need):
            victim = self._budget.least_recently_used(lambda other: other not in self._leases, keep=key)
            if victim is not None:
                await self._evict(victim, key)
                continue
            # Every loaded version is serving requests: wait for one to finish.
            remaining = deadline - asyncio.get_running_loop().time()
            budget_mb = (self._budget.limit_bytes or 0) // MIB
            if remaining <= 0:
                self._defer(
                    key, f"no room in MEMORY_BUDGET_MB ({budget_mb} MB): every loaded version is in use"
                )
                return False
            self._defer(
                key, f"waiting for room in MEMORY_BUDGET_MB ({budget_mb} MB): every loaded version is in use"
            )
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except TimeoutError:
                self._defer(
                    key,
                    f"no room in MEMORY_BUDGET_MB ({budget_mb} MB): every loaded version was serving "
                    f"requests for {wait_s:g} s",
                )
                return False
        return True

    def _defer(self, key: Key, reason: str) -> None:
        """`key` stays to be loaded on demand (EVICTED or LOADABLE), for `reason`."""
        state = self._status.get(key, _NONE).state
        self._set_status(key, state if state in ON_DEMAND else VersionState.LOADABLE, reason)

    async def _evict(self, key: Key, for_key: Key) -> None:
        self._metrics.model_evictions.labels(model=key[0]).inc()
        reason = f"evicted to make room for {for_key[0]} version {for_key[1]} (MEMORY_BUDGET_MB)"
        await self._unload(*key, reason=reason, final=VersionState.EVICTED)

    def _refuse_too_large(self, location: ModelLocation, need: int) -> None:
        key = (location.name, location.version)
        limit_mb = (self._budget.limit_bytes or 0) // MIB
        reason = (
            f"needs {need / MIB:.0f} MB, more than the whole memory budget of {limit_mb} MB; raise "
            "CONVSERVE_MEMORY_BUDGET_MB or serve it from a server with more memory"
        )
        self._failed[key] = _signature(location.path(self._settings.model_repository))
        self._too_large.add(key)
        self._set_status(key, VersionState.UNAVAILABLE, reason)
        logger.error("model %s version %d cannot be loaded: %s", key[0], key[1], reason)

    # ---- reconciliation ---------------------------------------------------------------------------

    async def sync(self, names: list[str], make_room: bool = False) -> None:
        """Load and unload versions of `names` so they match the repository and the version policy.

        Under a memory budget a version that does not fit is left to load on demand, unless it
        replaces a serving version (a new version of a model in use) or `make_room` (an explicit
        load) asks for idle versions to be evicted for it.
        """
        async with self._changes:
            for name in names:
                await self._sync_model(name, make_room)

    async def unload(self, name: str) -> None:
        """Unload every version of `name` (explicit model control); a required model stays required."""
        async with self._changes:
            for version in sorted(self._waiting.get(name, frozenset())):
                self._set_status((name, version), VersionState.UNAVAILABLE, "unloaded on request")
            for version in sorted(self._served.get(name, {})):
                await self._unload(name, version, reason="unloaded on request")

    async def close(self) -> None:
        """Unload everything, each version after finishing its accepted work."""
        self.stopping = True
        async with self._changes:
            for name in list(self._served):
                for version in sorted(self._served[name]):
                    await self._unload(name, version, reason="server shut down")

    async def _sync_model(self, name: str, make_room: bool) -> None:
        root = self._settings.model_repository
        on_disk = complete_versions(root / name)
        wanted = self._policy.select(on_disk)
        for version in wanted:
            if version not in self._served.get(name, {}) and not self._failed_unchanged(name, version):
                await self._load_or_defer(ModelLocation(name, version), make_room)
            if self.stopping:
                return
        serving = self._served.get(name, {})
        for version in sorted(self._waiting.get(name, frozenset()) - set(wanted)):
            unselected = "no longer selected by the version policy"
            self._set_status((name, version), VersionState.UNAVAILABLE, unselected)
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

    async def _load_or_defer(self, location: ModelLocation, make_room: bool) -> None:
        """Load `location` now if the budget allows (or room is to be made for it), else on demand."""
        key = (location.name, location.version)
        need = self._budget.need(key, location.path(self._settings.model_repository))
        swap = bool(self._served.get(location.name))
        if self._budget.exceeds_limit(need):
            self._refuse_too_large(location, need)
        elif self._budget.fits(need) or (
            (make_room or swap)
            and await self._make_room(location, self._settings.request_timeout_s if make_room else 0.0)
        ):
            await self._load(location)
        elif key not in self._too_large and self._status.get(key, _NONE).state not in ON_DEMAND:
            self._defer(key, "loads on the first request (MEMORY_BUDGET_MB)")

    def _failed_unchanged(self, name: str, version: int) -> bool:
        signature = self._failed.get((name, version))
        return signature is not None and signature == _signature(
            ModelLocation(name, version).path(self._settings.model_repository)
        )

    def _set_status(
        self,
        key: Key,
        state: VersionState,
        reason: str = "",
        *,
        provider: str = "",
        export: bool = True,
        on_demand: bool = False,
    ) -> None:
        """The one place a version's state changes: the index, the on-demand set and the metric follow.

        Requests reach a version to load on demand (LOADABLE, EVICTED) and, with `on_demand`, one in
        between (being loaded from there, or being evicted): they wait for it to load."""
        name, version = key
        self._status[key] = VersionStatus(name, version, state, reason)
        reachable = on_demand or state in ON_DEMAND
        waiting = self._waiting.get(name, frozenset())
        self._waiting[name] = waiting | {version} if reachable else waiting - {version}
        if export and state != VersionState.LOADING:  # a version's series appears once it is loaded
            self._metrics.set_model_state(name, version, state, provider)

    async def _load(self, location: ModelLocation, warm: bool = True) -> None:
        name, version = key = (location.name, location.version)
        path = location.path(self._settings.model_repository)
        # Requests that could load it on demand keep reaching it: they wait for this load.
        self._set_status(key, VersionState.LOADING, on_demand=version in self._waiting.get(name, frozenset()))
        started = time.perf_counter()
        fallbacks = self._metrics.gpu_fallbacks.labels(model=name)  # a session that leaves its GPU
        try:
            # The session's own memory (weights, graph, kernels' packed weights); the warmup grows the
            # arena every session shares, which belongs to the process, not to this version.
            model, cost = await asyncio.to_thread(
                measured,
                functools.partial(
                    load_model,
                    path,
                    self._settings.providers,
                    self._threads.intra_op_threads,
                    GpuOptions.from_settings(self._settings, lambda _reason: fallbacks.inc()),
                    self._threads.lone_threads,
                ),
                path,
            )
            check_gpu(model, self._settings.require_gpu)
            sizes = warmup_sizes(model, self._settings.max_batch_size) if warm or model.on_gpu else ()
            warmup = await asyncio.to_thread(model.warmup, sizes)
        except Exception as exc:  # a bad file must never take the server down: report it, keep serving
            self._failed[key] = _signature(path)
            reason = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
            self._set_status(key, VersionState.UNAVAILABLE, reason)
            self._metrics.model_loads.labels(model=name, result="failure").inc()
            logger.error(
                "model %s version %d failed to load after %.2f s: %s",
                name,
                version,
                time.perf_counter() - started,
                reason,
            )
            return
        self._failed.pop(key, None)
        self._too_large.discard(key)
        predictor = await Predictor.start(
            model.metadata,
            model.run,
            self._settings,
            self._metrics.for_model(name, version),
            self._decode_executor,
            max_batch_size=model.batch_limit(self._settings.max_batch_size),
            batch_sizes=model.batch_sizes(self._settings.max_batch_size),
            instances=self._threads.instances_on(model.on_gpu),
            lone_batches=model.lone_session is not None,
        )
        loaded = LoadedModel(location, model, predictor, time.perf_counter() - started, warmup, cost)
        self._served = {**self._served, name: {**self._served.get(name, {}), version: loaded}}
        self._budget.admit(key, cost)
        self._metrics.model_memory.labels(model=name, version=str(version)).set(cost)
        self._set_status(key, VersionState.READY, provider=model.active_provider)
        self._metrics.model_loads.labels(model=name, result="success").inc()
        self._metrics.model_load_duration.labels(model=name).observe(loaded.load_seconds)
        logger.info(
            "model %s version %d loaded in %.2f s (warmup of batch sizes %s: %.2f s) on %s, %.0f MB: input "
            "%s, %d classes, backbone %s",
            name,
            version,
            loaded.load_seconds,
            _sizes(sizes),
            warmup,
            model.active_provider,
            cost / MIB,
            list(model.metadata.input_shape),
            model.metadata.num_classes,
            model.metadata.backbone,
        )
        if self._budget.exceeds_limit(cost):
            await self._unload(name, version, reason="larger than the memory budget")
            self._refuse_too_large(location, cost)
            return
        while not self._budget.fits(0):  # it took more than reserved: others make way if they can
            victim = self._budget.least_recently_used(lambda other: other not in self._leases, keep=key)
            if victim is None:
                break
            await self._evict(victim, key)

    async def _unload(
        self, name: str, version: int, reason: str, final: VersionState = VersionState.UNAVAILABLE
    ) -> None:
        key = (name, version)
        loaded = self._served.get(name, {}).get(version)
        if loaded is None:
            return
        started = time.perf_counter()
        remaining = {v: m for v, m in self._served[name].items() if v != version}
        self._served = {**self._served, name: remaining}  # new requests no longer reach it
        provider = loaded.model.active_provider
        # A request for a version being evicted waits to load it again (its lease cannot delay this
        # unload: victims are idle, and the check below runs before anything awaits).
        self._set_status(
            key, VersionState.UNLOADING, reason, provider=provider, on_demand=final == VersionState.EVICTED
        )
        drain_s = self._settings.request_timeout_s + self._settings.body_timeout_s
        if key in self._leases:
            released = self._released[key] = asyncio.Event()
            try:
                await asyncio.wait_for(released.wait(), drain_s)
            except TimeoutError:
                logger.error(
                    "model %s version %d still held by requests after %.0f s", name, version, drain_s
                )
            finally:
                del self._released[key]
        await loaded.predictor.close()
        del loaded
        gc.collect()  # the session goes with the last reference
        await asyncio.to_thread(return_freed_memory)
        self._budget.release(key)
        self._metrics.forget_model(name, version)  # its series go with it, but an eviction stays visible
        self._set_status(key, final, reason, export=final == VersionState.EVICTED)
        logger.info(
            "model %s version %d unloaded in %.2f s: %s", name, version, time.perf_counter() - started, reason
        )


_NONE = VersionStatus("", 0, VersionState.UNAVAILABLE)


def _signature(path: Path) -> tuple[float, int]:
    try:
        stat = path.stat()
    except OSError:
        return (0.0, -1)
    return (stat.st_mtime, stat.st_size)


def _sizes(sizes: tuple[int, ...]) -> str:
    if not sizes:
        return "none"
    return ",".join(map(str, sizes)) if len(sizes) <= 2 else f"{sizes[0]}-{sizes[-1]}"
