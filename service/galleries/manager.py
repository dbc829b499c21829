"""Every model's gallery in this process: opened on first use, answered by one model version at a
time, and kept embedded for the versions served.

**Which version answers.** Embeddings of different versions are different spaces, so a gallery answers
with one version whose embeddings cover every entry (`pending == 0`): the newest such version among
those this process serves (and the version policy still selects), with an embedding output. While a
new version's embeddings are being computed, the version the gallery was built with answers if it is
still served (keep it with VERSION_POLICY=latest:2 to answer throughout a rollout); otherwise queries
get 503 with the progress and a Retry-After. Rows of two versions are never searched together.

**Adds** are embedded before they are written, by the version that answers (or, in a gallery no
version answers yet, the newest one served), so they keep that version complete and are searchable
at once; other versions pick them up in the background. Their images are background rows of the
model's batcher (`DynamicBatcher`): they yield to requests in small batches of their own, so a stream
of adds costs `/predict` a bounded share of the CPU, and an add under load takes longer instead.

**Re-embedding.** One background task per process walks the open galleries: for every served version
the policy selects, it embeds up to `REEMBED_BATCH` pending images through the model's own batcher,
as background rows like an add's, one step at a time (sustained traffic slows it without stopping
it). Embeddings of
versions the policy no longer selects are dropped. Several workers and replicas sharing the directory
each run this task; `GalleryStore.embedding_claim` lets one at a time embed a gallery, so a row is
computed once (and `set_embeddings` would keep it once anyway).

Blocking work (file I/O, fsync, journal replay, the search itself) runs on this manager's own threads,
never on the event loop; their count bounds how many run at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from modelcontract import complete_versions
from service.errors import (
    BadRequestError,
    DeadlineExceededError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceError,
    ServiceUnavailableError,
)
from service.galleries.search import GalleryAnswer, classify
from service.galleries.store import (
    GalleryCorruptError,
    GalleryFullError,
    GalleryStore,
    check_label,
)
from service.inference.predictor import NamedImage
from service.metrics import Metrics
from service.models.registry import LoadedModel, ModelRegistry
from service.models.repository import check_model_name
from service.priority import yield_to_the_event_loop
from service.settings import Settings
from service.textsafety import printable

logger = logging.getLogger(__name__)

T = TypeVar("T")

REEMBED_BATCH = 8
"""Images one background embedding step reads and embeds."""
_GALLERY_THREADS = 2
RETRY_AFTER_S = 5


class GalleriesOffError(NotFoundError):
    """This server has no gallery directory."""


class GalleryForbiddenError(ServiceError):
    """Gallery writes are turned off here, or would be open to anyone."""

    status_code: ClassVar[int] = 403
    reject_reason: ClassVar[str | None] = "unauthorized"


class GalleryConflictError(ServiceError):
    """The gallery cannot answer in its present state (empty, or not for that version), whatever the
    client retries; the message says what would change it."""

    status_code: ClassVar[int] = 409
    reject_reason: ClassVar[str | None] = "bad_input"


class GalleryNotReadyError(ServiceUnavailableError):
    """The gallery is being embedded by the version that would answer; retry shortly."""

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


@dataclass(frozen=True)
class GalleryListing:
    """What `GET /v1/models/{model}/gallery` shows."""

    model: str
    version: int | None
    """The version that answers queries now (None: none can)."""
    labels: dict[str, int]
    entries: int
    pending: int
    """Entries not yet embedded, summed over the served versions (0 = every one complete)."""
    versions: dict[int, dict[str, int]]
    """For each served version with an embedding: `{"embedded": rows, "pending": entries}`."""

    def body(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "labels": self.labels,
            "entries": self.entries,
            "pending": self.pending,
            "versions": {str(v): counts for v, counts in self.versions.items()},
        }


@dataclass(frozen=True)
class GalleryResult:
    """A gallery's answer for one request's images, all from one model version."""

    version: int
    entries: int
    """Examples searched (all of the gallery: the version's embeddings are complete)."""
    predictions: list[list[dict[str, Any]]]
    """Per image, labels best first, shaped like `/predict`'s: `{"label", "score", "votes",
    "similarity"}` (score: share of the k nearest examples' votes; similarity: of the label's nearest)."""
    neighbours: list[list[dict[str, Any]]]
    """Per image, the k nearest examples, nearest first: `{"id", "label", "similarity"}`."""

    def body(self) -> dict[str, Any]:
        """The answer as JSON-ready data: what `/predict?mode=gallery` returns beside the model."""
        return {
            "version": self.version,
            "entries": self.entries,
            "predictions": self.predictions,
            "neighbours": self.neighbours,
        }


def _answer(answer: GalleryAnswer) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    votes = [
        {"label": v.label, "score": v.score, "votes": v.votes, "similarity": v.best_similarity}
        for v in answer.votes
    ]
    near = [{"id": n.id, "label": n.label, "similarity": n.similarity} for n in answer.neighbours]
    return votes, near


def choose_version(
    candidates: Sequence[int], pending: dict[int, int], entries: int, requested: int | None
) -> int | None:
    """The version a gallery of `entries` answers with, among the served `candidates` whose `pending`
    entries are known; None when none can (see the module docstring)."""
    if requested is not None:
        return requested if requested in candidates and pending.get(requested, entries) == 0 else None
    complete = [v for v in candidates if pending.get(v, entries) == 0]
    return max(complete, default=None)


class GalleryManager:
    """The galleries of this process (one `GalleryStore` per model) and their background embedding."""

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics) -> None:
        self._settings = settings
        self._root = settings.gallery_dir
        self._registry = registry
        self._metrics = metrics
        self._stores: dict[str, GalleryStore] = {}
        self._opening: dict[str, asyncio.Task[GalleryStore]] = {}
        self._executor = ThreadPoolExecutor(
            _GALLERY_THREADS, thread_name_prefix="convserve-gallery", initializer=yield_to_the_event_loop
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failed: dict[tuple[str, int], set[str]] = {}
        """Entries a version could not embed (an image its preprocessing refuses): not retried."""

    @property
    def enabled(self) -> bool:
        return self._root is not None

    # ---- lifetime ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background embedding (nothing when galleries are off)."""
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._maintain(), name="convserve-gallery-embedding")

    async def stop(self) -> None:
        """Stop the background embedding, let the gallery threads finish, then close every gallery."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._opening.values()):
            task.cancel()
        await asyncio.gather(*self._opening.values(), return_exceptions=True)
        # A cancelled await leaves its thread running (a write, say): close the stores only after it,
        # since closing a store's lock file would release a writer's flock mid-append.
        await asyncio.to_thread(self._executor.shutdown, True)
        stores = list(self._stores.values())
        self._stores.clear()

        def close_all() -> None:
            for store in stores:
                store.close()

        await asyncio.to_thread(close_all)

    # ---- the API's operations ------------------------------------------------------------------------

    async def add(self, model: str, label: str, images: Sequence[NamedImage], arrived_at: float) -> list[str]:
        """Add one entry per image under `label`, embedded before anything is written; the new ids."""
        self.check_writable()
        check_label(label)
        store = await self.store(model)
        await self._run(lambda: self._check_room(store, images))
        version = await self._version_to_embed(model, store)
        async with self._registry.acquire(model, version) as loaded:
            self._check_embedding(loaded)
            deadline = loaded.predictor.deadline(arrived_at)
            embeddings = await loaded.predictor.embed_images(images, deadline, background=True)
        ids = await self._run(lambda: store.add(label, [image.data for image in images], embeddings, version))
        self._metrics.gallery_changes.labels(model=model, change="add").inc(len(ids))
        await self._observe(model, store)
        self._wake.set()  # other served versions have these to embed now
        return ids

    async def remove_label(self, model: str, label: str) -> int:
        """Remove every entry of `label`; 404 if the gallery has none."""
        self.check_writable()
        check_label(label)
        store = await self.store(model)
        removed = await self._run(lambda: store.remove_label(label))
        if not removed:
            raise NotFoundError(
                f"the gallery of {printable(model, 80)!r} has no label {printable(label, 80)!r}; "
                f"GET /v1/models/{printable(model, 80)}/gallery lists its labels"
            )
        self._metrics.gallery_changes.labels(model=model, change="remove").inc(removed)
        await self._observe(model, store)
        return removed

    async def remove_entry(self, model: str, entry_id: str) -> None:
        """Remove one entry by its id; 404 if there is none."""
        self.check_writable()
        store = await self.store(model)
        if not await self._run(lambda: store.remove_id(entry_id)):
            raise NotFoundError(
                f"the gallery of {printable(model, 80)!r} has no entry {printable(entry_id, 40)!r}; ids are "
                "the 16 hex digits an add returned"
            )
        self._metrics.gallery_changes.labels(model=model, change="remove").inc()
        await self._observe(model, store)

    async def listing(self, model: str) -> GalleryListing:
        """The labels with their counts, and which version answers."""
        store = await self.store(model)
        candidates = self._candidates(model)
        labels, pending, entries = await self._run(lambda: self._read_state(store, candidates))
        versions = {v: {"embedded": entries - pending[v], "pending": pending[v]} for v in sorted(candidates)}
        return GalleryListing(
            model=model,
            version=choose_version(sorted(candidates), pending, entries, None) if entries else None,
            labels=labels,
            entries=entries,
            pending=sum(pending.values()),
            versions=versions,
        )

    async def version_for(self, model: str | None, requested: int | None = None) -> int:
        """The version whose embeddings answer `model`'s gallery (None: the default model's; `requested`,
        if given and able to); 409 or 503 saying why none can. Embed with it, then call `classify`."""
        if model is None:
            model = self.default_model()
        store = await self.store(model)
        candidates = self._candidates(model)
        _, pending, entries = await self._run(lambda: self._read_state(store, candidates))
        shown = printable(model, 80)
        if not entries:
            raise GalleryConflictError(
                f"the gallery of {shown!r} is empty; add labelled examples with POST "
                f"/v1/models/{shown}/gallery first"
            )
        if requested is not None:
            self._check_embedding(self._registry.resolve(model, requested))  # 404/503 if not served
        version = choose_version(sorted(candidates), pending, entries, requested)
        if version is not None:
            return version
        if not candidates:
            raise GalleryNotReadyError(
                f"no version of {shown!r} is loaded to search its gallery; retry shortly (see /readyz)"
            )
        progress = ", ".join(f"version {v}: {pending[v]} of {entries} pending" for v in sorted(candidates))
        which = f"version {requested} does" if requested is not None else "no served version does"
        raise GalleryNotReadyError(
            f"the gallery of {shown!r} is being embedded ({progress}), and {which} not cover all of it "
            "yet; retry shortly"
        )

    async def classify(self, model: str, version: int, embeddings: np.ndarray, top_k: int) -> GalleryResult:
        """The gallery's answer to `embeddings` ([N, D], computed by `version`, unit rows): the `top_k`
        labels of the vote among the CONVSERVE_GALLERY_K nearest examples of each row, and those
        examples. 503 if `version` no longer covers the whole gallery (use `version_for` first)."""
        if top_k < 1:
            raise InvalidInputError(f"top_k must be at least 1, got {top_k}")
        store = await self.store(model)
        k = self._settings.gallery_k

        def search() -> GalleryResult:
            started = time.perf_counter()
            matrix = store.matrix(version)
            if not len(matrix) and not matrix.pending:
                raise GalleryConflictError(f"the gallery of {printable(model, 80)!r} is empty")
            if matrix.pending or not len(matrix):
                raise GalleryNotReadyError(
                    f"the gallery of {printable(model, 80)!r} changed: version {version} has "
                    f"{matrix.pending} entries still to embed; retry shortly"
                )
            answers = [_answer(answer) for answer in classify(matrix, embeddings, k, top_k)]
            self._metrics.gallery_query_duration.labels(model=model).observe(time.perf_counter() - started)
            return GalleryResult(
                version=version,
                entries=len(matrix),
                predictions=[votes for votes, _ in answers],
                neighbours=[near for _, near in answers],
            )

        return await self._run(search)

    def default_model(self) -> str:
        """The model a request without `?model=` uses; 400 when the server has none."""
        if self._registry.default_name is None:
            raise BadRequestError(
                "this server has no default model; choose one with ?model=NAME, or set CONVSERVE_MODEL_NAME"
            )
        return self._registry.default_name

    # ---- access and opening --------------------------------------------------------------------------

    def check_enabled(self) -> Path:
        if self._root is None:
            raise GalleriesOffError(
                "galleries are off on this server; set CONVSERVE_GALLERY_DIR to a directory on a "
                "persistent volume to turn them on (docs/galleries.md)"
            )
        return self._root

    def check_writable(self) -> None:
        """403 unless gallery writes are on and guarded by the admin token (or knowingly open)."""
        self.check_enabled()
        settings = self._settings
        if not settings.gallery_writes:
            raise GalleryForbiddenError(
                "the galleries are read-only on this server (CONVSERVE_GALLERY_WRITES=false); add and "
                "remove examples through a server that allows it"
            )
        if not settings.has_token("admin") and not settings.unsafe_unauthenticated_admin:
            raise GalleryForbiddenError(
                "gallery writes change every client's answers and need the admin token, but this server "
                "has none; set CONVSERVE_ADMIN_TOKEN (or, on a port nobody else reaches, "
                "CONVSERVE_UNSAFE_UNAUTHENTICATED_ADMIN=true)"
            )

    async def store(self, model: str) -> GalleryStore:
        """The gallery of a model this server serves, opened (off the event loop) on first use; 404 for
        any other model name, which never becomes a path."""
        root = self.check_enabled()
        name = check_model_name(model)
        if name not in self._stores:
            self._registry.model_ready(name, None)  # 404 for a model the server knows nothing of
        store = self._stores.get(name)
        if store is not None:
            return store
        task = self._opening.get(name)
        if task is None:
            task = asyncio.ensure_future(self._open(root, name))
            self._opening[name] = task
            task.add_done_callback(lambda _: self._opening.pop(name, None))
        return await asyncio.shield(task)

    async def _open(self, root: Path, name: str) -> GalleryStore:
        settings = self._settings
        try:
            store = await self._run(
                lambda: GalleryStore(
                    root,
                    name,
                    max_entries=settings.gallery_max_entries,
                    max_bytes=settings.gallery_max_bytes,
                )
            )
        except (GalleryCorruptError, OSError) as exc:
            logger.error("gallery of %s cannot be opened: %s", name, exc)
            raise ServiceUnavailableError(
                f"the gallery of {printable(name, 80)!r} cannot be opened on the server ({exc}); an operator "
                "must fix the gallery directory"
            ) from None
        self._stores[name] = store
        await self._observe(name, store)
        self._wake.set()
        return store

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    # ---- versions ------------------------------------------------------------------------------------

    def _candidates(self, model: str) -> dict[int, LoadedModel]:
        """The loaded versions of `model` that give embeddings."""
        found = {}
        for version in self._registry.served().get(model, []):
            try:
                loaded = self._registry.resolve(model, version)
            except ServiceError:
                continue  # unloaded since
            if loaded.predictor.metadata.has_embedding:
                found[version] = loaded
        return found

    @staticmethod
    def _check_embedding(loaded: LoadedModel) -> None:
        if not loaded.predictor.metadata.has_embedding:
            raise GalleryConflictError(
                f"model {printable(loaded.name, 80)!r} version {loaded.version} has no embedding output, so "
                "it cannot search a gallery; export it again with `python -m training` (docs/galleries.md)"
            )

    @staticmethod
    def _read_state(
        store: GalleryStore, candidates: dict[int, LoadedModel]
    ) -> tuple[dict[str, int], dict[int, int], int]:
        labels = store.labels()
        entries = sum(labels.values())
        pending = {v: store.matrix(v).pending for v in candidates}
        return labels, pending, entries

    async def _version_to_embed(self, model: str, store: GalleryStore) -> int:
        """The version an add embeds with: the one that answers, else the newest served."""
        candidates = self._candidates(model)
        if not candidates:
            newest = self._registry.resolve(model, None)  # 404/503 for a model not loaded
            self._check_embedding(newest)
            return newest.version
        _, pending, entries = await self._run(lambda: self._read_state(store, candidates))
        return choose_version(sorted(candidates), pending, entries, None) or max(candidates)

    def _selected(self, model: str) -> list[int]:
        """The versions the version policy selects in the repository: what any server sharing it serves."""
        return self._settings.policy.select(complete_versions(self._settings.model_repository / model))

    @staticmethod
    def _check_room(store: GalleryStore, images: Sequence[NamedImage]) -> None:
        """Refuse an add that cannot fit before its images cost any decoding (the store checks again,
        exactly, under its lock)."""
        stats = store.stats()
        size = sum(len(image.data) for image in images)
        if len(images) > stats.max_entries or size > stats.max_bytes:
            raise PayloadTooLargeError(
                f"this add holds {len(images)} images and {size} bytes, more than a whole gallery may hold "
                f"({stats.max_entries} entries, {stats.max_bytes} bytes); send fewer or smaller images"
            )
        if stats.entries + len(images) > stats.max_entries or stats.bytes + size > stats.max_bytes:
            raise GalleryFullError(
                f"the gallery of {store.model!r} holds {stats.entries} of at most {stats.max_entries} "
                f"entries and {stats.bytes} of at most {stats.max_bytes} bytes: no room for {len(images)} "
                f"images of {size} bytes; remove entries or raise CONVSERVE_GALLERY_MAX_ENTRIES / "
                "CONVSERVE_GALLERY_MAX_BYTES"
            )

    async def _observe(self, model: str, store: GalleryStore) -> None:
        """Export the gallery's size and each served version's pending entries."""
        candidates = self._candidates(model)
        _, pending, entries = await self._run(lambda: self._read_state(store, candidates))
        self._metrics.gallery_entries.labels(model=model).set(entries)
        for version, count in pending.items():
            self._metrics.gallery_pending.labels(model=model, version=str(version)).set(count)

    # ---- background embedding ------------------------------------------------------------------------

    async def _maintain(self) -> None:
        """Embed pending entries for every served version, drop versions no longer selected; forever."""
        while True:
            self._wake.clear()  # an add from now on wakes the next round
            busy = False
            try:
                await self._open_existing()
                for name, store in list(self._stores.items()):
                    busy |= await self._maintain_gallery(name, store)
            except asyncio.CancelledError:
                raise
            except Exception:  # logged and retried: the service keeps answering meanwhile
                poll_s = self._settings.repository_poll_s
                logger.exception("gallery embedding failed; retrying in %g s", poll_s)
            if busy:
                continue  # more to embed: the next batch at once
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.repository_poll_s)

    async def _open_existing(self) -> None:
        """Open the galleries on disk of the models served, so that they are embedded before a query."""
        root = self._root
        assert root is not None
        served = [name for name in self._registry.served() if name not in self._stores]
        on_disk = await self._run(lambda: [name for name in served if (root / name).is_dir()])
        for name in on_disk:
            try:
                await self.store(name)
            except ServiceError as exc:
                logger.warning("gallery of %s not opened: %s", name, exc.message)

    async def _maintain_gallery(self, name: str, store: GalleryStore) -> bool:
        """One step for one gallery; whether it embedded something (and may have more to embed)."""
        busy = False
        selected = await self._run(partial(self._selected, name))
        candidates = self._candidates(name)
        for version in sorted(candidates, reverse=True):
            if version in selected:
                busy |= await self._embed_step(name, store, candidates[version])
        if selected:  # an unreadable repository lists nothing: drop nothing then
            stats = await self._run(store.stats)
            for version in stats.rows_per_version:
                if version not in selected and version not in candidates:
                    await self._run(partial(store.drop_version, version))
                    self._metrics.forget_gallery_version(name, version)
                    logger.info("gallery of %s: dropped the embeddings of version %d", name, version)
        await self._observe(name, store)
        return busy

    async def _embed_step(self, name: str, store: GalleryStore, loaded: LoadedModel) -> bool:
        """Embed up to REEMBED_BATCH pending entries of `loaded`'s version, if no other process is."""
        version = loaded.version
        failed = self._failed.setdefault((name, version), set())
        claim = store.embedding_claim()
        if not await self._run(claim.__enter__):  # a flock on the shared directory: off the loop
            await self._run(lambda: claim.__exit__(None, None, None))
            return False
        try:
            with self._registry.lease(loaded):
                wanted = await self._run(lambda: store.missing(version, REEMBED_BATCH + len(failed)))
                batch = [(entry_id, data) for entry_id, data in wanted if entry_id not in failed]
                batch = batch[:REEMBED_BATCH]
                if not batch:
                    return False
                try:
                    ids, rows = await self._embed(loaded, batch, failed)
                except (ServiceUnavailableError, DeadlineExceededError) as exc:
                    # Overloaded or shutting down: requests come first; the next round retries.
                    logger.debug("gallery of %s: embedding postponed: %s", name, exc.message)
                    return False
                if ids:
                    await self._run(lambda: store.set_embeddings(version, ids, rows))
            return True
        finally:
            await self._run(lambda: claim.__exit__(None, None, None))

    async def _embed(
        self, loaded: LoadedModel, batch: list[tuple[str, bytes]], failed: set[str]
    ) -> tuple[list[str], np.ndarray]:
        """The embeddings of `batch`; an image the version refuses is embedded alone to find it, then
        left out (and logged) so that it does not block the rest."""
        predictor = loaded.predictor
        images = [NamedImage(entry_id, data) for entry_id, data in batch]
        try:
            rows = await predictor.embed_images(images, predictor.deadline(time.monotonic()), background=True)
            return [entry_id for entry_id, _ in batch], rows
        except InvalidInputError as exc:
            if len(batch) == 1:
                failed.add(batch[0][0])
                logger.warning(
                    "gallery of %s: version %d cannot embed entry %s: %s",
                    loaded.name,
                    loaded.version,
                    batch[0][0],
                    exc.message,
                )
                return [], np.empty((0, 0), np.float32)
        ids: list[str] = []
        parts: list[np.ndarray] = []
        for item in batch:
            one_ids, one_rows = await self._embed(loaded, [item], failed)
            ids += one_ids
            if one_ids:
                parts.append(one_rows)
        return ids, np.concatenate(parts) if parts else np.empty((0, 0), np.float32)
