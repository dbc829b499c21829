"""`python -m benchmarks.fewshot.scale`: galleries at scale, measured through the real service.

Every figure comes from `python -m service` in its own process, over real HTTP, with real photos:

- **Query latency.** Galleries of `--sizes` synthetic entries (random unit rows of the model's
  embedding width, tiny distinct image bytes, 1000 labels) are written with `GalleryStore` before the
  server starts, as a restarted server finds them. At concurrency 1, `--requests` rounds each send the
  same photo to `/predict?mode=gallery` and to plain `/predict` (the order alternating per round), so
  the difference of their percentiles is what the search costs a user. An empty gallery is asked once,
  to record what the service answers.
- **Memory per entry.** The server's RSS after its first gallery query, minus that of a server whose
  gallery holds `BASELINE_ENTRIES`, over the entries. It is set beside what the store itself holds
  (`GalleryStore` opened in this process under `tracemalloc`): the embedding rows (4 x D bytes), the
  spare rows its growth keeps, and its ids, labels and entry records; the remainder is the server's.
- **Adds under load.** `--clients` clients send `/predict` (classifier) back to back while one more
  adds `--adds` real photos (seeded crops of scikit-image's photos, so each is decoded and embedded)
  through `POST /v1/models/{model}/gallery`, `--add-batch` files a request. The 'with adds' window is
  exactly the adds' duration; the 'without' window has the same length and starts once every request
  in flight during the adds has been answered (the adds' length is known only when they end, so the
  quiet window follows them). A request belongs to a window when it was in flight during it, so
  neither window can be empty while the clients run. `GET …/gallery` then counts the added entries.

The default model is the ImageNet EfficientNet-Lite0 exported fresh (the repository's copy carries no
embedding output) into a temporary directory, or into `--workdir` to reuse it; `--model-repository`
serves a model of your own instead. `--report-only` rewrites docs/galleries.md's block from the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import secrets
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks.common.corpus import Photo, build_corpus
from benchmarks.common.docblock import replace_block
from benchmarks.common.loadgen import (
    LoadRun,
    Outcome,
    Send,
    Transport,
    Window,
    client_session,
    closed_loop,
    multipart_transport,
    post_photo,
)
from benchmarks.common.machine import describe_machine, other_processes_cpu
from benchmarks.common.processes import LOOPBACK, ServerProcess, free_port, python_module_command, rss_mb
from benchmarks.common.promtext import scrape
from benchmarks.common.results import read_json, write_json
from benchmarks.common.stats import latency_summary_ms
from benchmarks.fewshot import DOC, REPO_ROOT, SCALE_BLOCK_END, SCALE_BLOCK_START, SCALE_RESULTS
from benchmarks.fewshot.report import render_scale
from benchmarks.fewshot.views import PHOTO_CLASSES, encode_jpeg, random_view, view_image
from service.galleries.store import GalleryStore
from training.modelfile import read_metadata
from training.photos import sample_photo

log = logging.getLogger(__name__)

DEFAULT_SIZES = (10_000, 100_000)
BASELINE_ENTRIES = 10
"""Entries of the gallery whose server's RSS is subtracted: the server with galleries on, nearly empty."""
LABELS = 1000
ENTRIES_PER_ADD = 10
"""Synthetic entries written per `GalleryStore.add` call (each call holds one label)."""
QUERY_MEGAPIXELS = 1.0
"""Size of the photo every latency request sends (the corpus's first photo, the cat, at this size)."""
ADD_LABEL_PREFIX = "added-"
TARGET_P99_RATIO = 1.5
"""The product owner's bound on /predict's p99 while adds run, relative to without them."""
WARMUP_REQUESTS = 5
"""Requests of each kind sent before the measured rounds (connections, thread pools, caches)."""
REQUEST_TIMEOUT_S = 120.0
SEARCH_METRIC = "convserve_gallery_query_seconds"


@dataclass(frozen=True)
class ServedModel:
    """The one model version every server of the run serves."""

    repository: Path
    name: str
    version: int
    dim: int
    """Width of its embedding output."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "embedding_size": self.dim}


def served_model(repository: Path, name: str, version: int) -> ServedModel:
    """`repository/name/version`, refused unless it has an embedding output to search with."""
    path = repository / name / str(version) / "model.onnx"
    if not path.is_file():
        raise SystemExit(
            f"no model file at {path}; pass --model-repository, --model-name and --model-version"
        )
    metadata = read_metadata(path)
    if not metadata.has_embedding or metadata.embedding_size is None:
        raise SystemExit(
            f"{path} has no embedding output, so it cannot search a gallery; export it again with "
            "`python -m training`, or leave out --model-repository to export the ImageNet default"
        )
    return ServedModel(repository, name, version, metadata.embedding_size)


def export_default(workdir: Path) -> ServedModel:
    """The ImageNet EfficientNet-Lite0 as `python -m training pretrained` exports it (with its embedding),
    in `workdir/repository`; reused when already there."""
    repository = workdir / "repository"
    name = "efficientnet_lite0_imagenet"
    if not (repository / name / "1" / "model.onnx").is_file():
        from training.imagenet import export_imagenet_model  # noqa: PLC0415 (torch, only to export)

        export_imagenet_model(repository / name)
    return served_model(repository, name, 1)


# ---- galleries written before a server starts ---------------------------------------------------------


def open_store(root: Path, model: ServedModel, max_entries: int) -> GalleryStore:
    return GalleryStore(root, model.name, max_entries=max_entries, max_bytes=max_bytes(max_entries, model))


def max_bytes(entries: int, model: ServedModel) -> int:
    """A byte bound that holds `entries` real photos and their rows with room to spare."""
    return entries * (model.dim * 4 + 256 * 1024)


def grow_gallery(store: GalleryStore, model: ServedModel, target: int, seed: int = 0) -> float:
    """Add synthetic entries until the gallery holds `target`; the seconds it took."""
    started = time.perf_counter()
    held = store.stats().entries
    rng = np.random.default_rng(seed + held)
    for start in range(held, target, ENTRIES_PER_ADD):
        count = min(ENTRIES_PER_ADD, target - start)
        rows = rng.standard_normal((count, model.dim), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        images = [f"synthetic-{start + i}".encode() for i in range(count)]
        store.add(f"synthetic-{(start // ENTRIES_PER_ADD) % LABELS:04d}", images, rows, model.version)
    return round(time.perf_counter() - started, 1)


def store_memory(root: Path, model: ServedModel, max_entries: int) -> dict[str, float]:
    """Bytes per entry of a `GalleryStore` opened and searched in this process, traced: its rows, the
    spare rows beyond them, and everything else it holds (ids, labels, entry records, indexes)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with open_store(root, model, max_entries) as store:
            matrix = store.matrix(model.version)
            held = tracemalloc.get_traced_memory()[0] - before
            entries = len(matrix)
            # The matrix is a view of the first rows of the store's growing buffer (`_VersionRows`).
            base = matrix.vectors.base
            capacity = base.shape[0] if isinstance(base, np.ndarray) and base.ndim == 2 else entries
    finally:
        tracemalloc.stop()
    row_bytes = model.dim * 4
    return {
        "embedding_bytes_per_entry": row_bytes,
        "spare_row_bytes_per_entry": round((capacity - entries) * row_bytes / entries, 1),
        "store_other_bytes_per_entry": round((held - capacity * row_bytes) / entries, 1),
        "store_bytes_per_entry": round(held / entries, 1),
    }


# ---- the server ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What every server of one run shares: the model, the work directory, the admin token, the query
    photo, the gallery bound (every size, the baseline and the adds fit) and the options."""

    model: ServedModel
    workdir: Path
    token: str
    photo: Photo
    max_entries: int
    options: argparse.Namespace

    def store(self, gallery_dir: Path) -> GalleryStore:
        return open_store(gallery_dir, self.model, self.max_entries)

    def service(self, gallery_dir: Path, name: str) -> ServerProcess:
        """`python -m service` serving the model with its galleries in `gallery_dir`."""
        port = free_port()
        model = self.model
        return ServerProcess(
            name=name,
            command=python_module_command("service"),
            env={
                "CONVSERVE_MODEL_REPOSITORY": str(model.repository),
                "CONVSERVE_MODEL_NAME": model.name,
                "CONVSERVE_MODEL_VERSION": str(model.version),
                "CONVSERVE_HOST": LOOPBACK,
                "CONVSERVE_PORT": str(port),
                "CONVSERVE_GRPC_PORT": "0",
                "CONVSERVE_GALLERY_DIR": str(gallery_dir),
                "CONVSERVE_GALLERY_MAX_ENTRIES": str(self.max_entries),
                "CONVSERVE_GALLERY_MAX_BYTES": str(max_bytes(self.max_entries, model)),
                "CONVSERVE_ADMIN_TOKEN": self.token,
            },
            port=port,
            log_path=self.workdir / "logs" / f"{name}.log",
        )


def predict_url(server: ServerProcess, model: ServedModel, gallery: bool) -> str:
    mode = "&mode=gallery" if gallery else ""
    return f"{server.url}/predict?model={model.name}{mode}"


async def ask(url: str, photo: Photo) -> tuple[int, dict[str, Any], float]:
    """One upload to `url`: the status, the JSON answer and the seconds it took."""
    form = aiohttp.FormData()
    form.add_field("file", photo.data, filename=photo.filename, content_type="image/jpeg")
    async with client_session(1, REQUEST_TIMEOUT_S) as session:
        started = time.perf_counter()
        async with session.post(url, data=form) as response:
            body = await response.json(content_type=None)
            return response.status, body, time.perf_counter() - started


async def first_gallery_query(server: ServerProcess, model: ServedModel, photo: Photo, entries: int) -> float:
    """Seconds of the server's first gallery query (which waits for the journal's replay); raises unless
    it searched all `entries`."""
    status, body, seconds = await ask(predict_url(server, model, gallery=True), photo)
    if status != 200 or body.get("entries") != entries:
        raise RuntimeError(
            f"the first gallery query answered {status} {body!r}, expected 200 over {entries} entries; "
            f"server log:\n{server.log_tail()}"
        )
    return seconds


async def latency_rounds(
    server: ServerProcess, model: ServedModel, photo: Photo, requests: int
) -> dict[str, Any]:
    """`requests` rounds of one gallery and one classifier request at concurrency 1, alternating which
    goes first; the latency of each kind and the server's own search time."""
    urls = {"gallery": predict_url(server, model, True), "classifier": predict_url(server, model, False)}
    durations: dict[str, list[float]] = {kind: [] for kind in urls}
    errors: dict[str, list[str]] = {kind: [] for kind in urls}
    async with client_session(1, REQUEST_TIMEOUT_S) as session:
        for _ in range(WARMUP_REQUESTS):
            for url in urls.values():
                await post_photo(session, url, photo)
        before = await scrape(server.url)
        for index in range(requests):
            order = list(urls) if index % 2 == 0 else list(reversed(urls))
            for kind in order:
                started = time.perf_counter()
                status, error = await post_photo(session, urls[kind], photo)
                if status == 200:
                    durations[kind].append(time.perf_counter() - started)
                else:
                    errors[kind].append(error or f"http_{status}")
        after = await scrape(server.url)
    searched = after[SEARCH_METRIC].count - before[SEARCH_METRIC].count
    search_ms = (after[SEARCH_METRIC].sum - before[SEARCH_METRIC].sum) / searched * 1000 if searched else None
    result: dict[str, Any] = {
        kind: {
            "ok": len(durations[kind]),
            "errors": len(errors[kind]),
            "error_kinds": sorted(set(errors[kind])),
            **latency_summary_ms(durations[kind]),
        }
        for kind in urls
    }
    result["difference_ms"] = {
        key: _minus(result["gallery"][key], result["classifier"][key])
        for key in ("p50_ms", "p99_ms", "mean_ms")
    }
    result["server_search_mean_ms"] = None if search_ms is None else round(search_ms, 2)
    return result


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


# ---- adds under load -------------------------------------------------------------------------------------


class _Tracker:
    """What the load's clients are doing: answers so far, and the send times of requests in flight."""

    def __init__(self) -> None:
        self.answered = 0
        self.in_flight: dict[int, float] = {}
        self.changed = asyncio.Condition()
        self._numbers = itertools.count()

    def sent(self) -> int:
        number = next(self._numbers)
        self.in_flight[number] = time.perf_counter()
        return number

    async def finished(self, number: int) -> None:
        del self.in_flight[number]
        self.answered += 1
        async with self.changed:
            self.changed.notify_all()


def tracked(transport: Transport, tracker: _Tracker) -> Transport:
    """`transport`, telling `tracker` when each request is sent and answered."""

    @asynccontextmanager
    async def connect(connections: int, timeout_s: float) -> AsyncIterator[Send]:
        async with transport(connections, timeout_s) as send:

            async def send_tracked(photo: Photo) -> tuple[int | None, str | None]:
                number = tracker.sent()
                try:
                    return await send(photo)
                finally:
                    await tracker.finished(number)

            yield send_tracked

    return connect


def crops(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`count` seeded crops of the few-shot benchmark's photos as JPEGs, with their photo's name."""
    rng = np.random.default_rng(seed)
    names = list(PHOTO_CLASSES)
    photos = {name: sample_photo(name) for name in names}
    made = []
    for index in range(count):
        name = names[index % len(names)]
        made.append((name, encode_jpeg(view_image(photos[name], random_view(photos[name].size, rng)))))
    return made


async def add_photos(
    server: ServerProcess, model: ServedModel, token: str, images: list[tuple[str, bytes]], per_request: int
) -> dict[str, Any]:
    """POST `images` to the gallery, `per_request` at a time under one label each; ids, errors, seconds."""
    url = f"{server.url}/v1/models/{model.name}/gallery"
    headers = {"Authorization": f"Bearer {token}"}
    added, errors, latencies = 0, [], []
    async with client_session(1, REQUEST_TIMEOUT_S) as session:
        for start in range(0, len(images), per_request):
            batch = images[start : start + per_request]
            form = aiohttp.FormData()
            form.add_field("label", f"{ADD_LABEL_PREFIX}{batch[0][0]}")
            for offset, (name, data) in enumerate(batch):
                form.add_field(
                    "image", data, filename=f"{name}-{start + offset}.jpg", content_type="image/jpeg"
                )
            sent = time.perf_counter()
            async with session.post(url, data=form, headers=headers) as response:
                body = await response.json(content_type=None)
            latencies.append(time.perf_counter() - sent)
            if response.status == 201:
                added += len(body["ids"])
            else:
                errors.append(f"{response.status}: {body.get('error', body)}")
    return {"added": added, "errors": errors, "request_latency_ms": latency_summary_ms(latencies)}


async def gallery_counts(server: ServerProcess, model: ServedModel) -> dict[str, Any]:
    async with (
        client_session(1, REQUEST_TIMEOUT_S) as session,
        session.get(f"{server.url}/v1/models/{model.name}/gallery") as response,
    ):
        response.raise_for_status()
        listing: dict[str, Any] = await response.json()
    return listing


def in_window(run: LoadRun, start: float, end: float) -> list[Outcome]:
    """The run's requests in flight at some moment of [start, end)."""
    return [o for o in run.outcomes if o.sent < end and o.finished >= start]


def window_summary(outcomes: list[Outcome]) -> dict[str, Any]:
    answered = [o.latency_s for o in outcomes if o.kind == "answered"]
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(answered),
        **latency_summary_ms(answered),
    }


async def adds_under_load(
    server: ServerProcess, model: ServedModel, token: str, photos: Sequence[Photo], args: argparse.Namespace
) -> dict[str, Any]:
    """`/predict` at `args.clients` clients: a window while `args.adds` photos are added, and one as long
    without (see the module docstring)."""
    images = crops(args.adds)
    before = await gallery_counts(server, model)
    tracker = _Tracker()
    stop = asyncio.Event()
    target = tracked(multipart_transport(predict_url(server, model, gallery=False)), tracker)
    load = asyncio.create_task(
        closed_loop(
            target,
            photos,
            args.clients,
            Window(duration_s=24 * 3600.0),
            stop=stop,
            request_timeout_s=REQUEST_TIMEOUT_S,
        )
    )
    try:
        async with tracker.changed:
            # Warmed up once every client has had answers: an arranged condition, not a wait.
            await asyncio.wait_for(
                tracker.changed.wait_for(lambda: tracker.answered >= 2 * args.clients), REQUEST_TIMEOUT_S
            )
        adds_start = time.perf_counter()
        added = await add_photos(server, model, token, images, args.add_batch)
        adds_end = time.perf_counter()
        async with tracker.changed:
            # The quiet window starts once no request that overlapped the adds is still in flight.
            await asyncio.wait_for(
                tracker.changed.wait_for(
                    lambda: all(sent >= adds_end for sent in tracker.in_flight.values())
                ),
                REQUEST_TIMEOUT_S,
            )
        quiet_start = time.perf_counter()
        await asyncio.sleep(adds_end - adds_start)
        quiet_end = time.perf_counter()
    finally:
        stop.set()
        run = await load
    after = await gallery_counts(server, model)
    counted = sum(n for label, n in after["labels"].items() if label.startswith(ADD_LABEL_PREFIX))
    duration = adds_end - adds_start
    without = window_summary(in_window(run, quiet_start, quiet_end))
    with_adds = window_summary(in_window(run, adds_start, adds_end))
    ratio = (
        round(with_adds["p99_ms"] / without["p99_ms"], 2)
        if with_adds["p99_ms"] is not None and without["p99_ms"]
        else None
    )
    return {
        "clients": args.clients,
        "images": len(images),
        "per_request": args.add_batch,
        "window_s": round(duration, 2),
        "without_adds": without,
        "with_adds": with_adds,
        "p99_ratio": ratio,
        "target_p99_ratio": TARGET_P99_RATIO,
        "within_target": ratio is not None and ratio <= TARGET_P99_RATIO,
        "images_per_s": round(added["added"] / duration, 2),
        "add_requests": added,
        "entries_before": before["entries"],
        "entries_after": after["entries"],
        "added_entries_counted": counted,
        "all_present": counted == len(images) and after["entries"] - before["entries"] == len(images),
    }


# ---- the run ------------------------------------------------------------------------------------------


async def baseline_and_adds(run: Run) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """On one server: what an empty gallery answers, RSS at `BASELINE_ENTRIES`, then adds under load."""
    model, photo = run.model, run.photo
    gallery_dir = run.workdir / "galleries-baseline"
    with run.service(gallery_dir, "baseline") as server:
        status, body, _ = await ask(predict_url(server, model, gallery=True), photo)
        empty = {"status": status, "error": body.get("error")}
        # Written beside the running server, as another worker would: the store is multi-process safe.
        with run.store(gallery_dir) as store:
            grow_gallery(store, model, BASELINE_ENTRIES)
        await first_gallery_query(server, model, photo, BASELINE_ENTRIES)
        baseline = {"entries": BASELINE_ENTRIES, "rss_mb": rss_mb(server.pid)}
        adds = await adds_under_load(server, model, run.token, build_corpus(), run.options)
    return empty, baseline, adds


async def at_size(run: Run, entries: int, baseline: dict[str, Any]) -> dict[str, Any]:
    """Grow the shared synthetic gallery to `entries`, then serve it: memory and latency."""
    model, photo = run.model, run.photo
    gallery_dir = run.workdir / "galleries-synthetic"
    with run.store(gallery_dir) as store:
        build_s = grow_gallery(store, model, entries)
    memory = store_memory(gallery_dir, model, run.max_entries)
    with run.service(gallery_dir, f"gallery-{entries}") as server:
        first_s = await first_gallery_query(server, model, photo, entries)
        rss = rss_mb(server.pid)
        latency = await latency_rounds(server, model, photo, run.options.requests)
    per_entry = (rss - baseline["rss_mb"]) * 2**20 / (entries - baseline["entries"])
    memory["rss_bytes_per_entry"] = round(per_entry, 1)
    memory["server_other_bytes_per_entry"] = round(per_entry - memory["store_bytes_per_entry"], 1)
    log.info("%d entries: search costs %s", entries, latency["difference_ms"])
    return {
        "entries": entries,
        "labels": min(LABELS, -(-entries // ENTRIES_PER_ADD)),
        "build_s": build_s,
        "startup_s": server.startup_s,
        "first_query_ms": round(first_s * 1000, 1),
        "rss_mb": rss,
        "memory": memory,
        **latency,
    }


async def measure(model: ServedModel, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    photo = build_corpus((QUERY_MEGAPIXELS,))[0]
    max_entries = max(args.sizes) + BASELINE_ENTRIES + args.adds
    run = Run(model, workdir, secrets.token_hex(32), photo, max_entries, args)
    for leftover in ("galleries-baseline", "galleries-synthetic"):  # a reused --workdir starts empty
        shutil.rmtree(workdir / leftover, ignore_errors=True)
    results: dict[str, Any] = {
        "machine": describe_machine(REPO_ROOT),
        "other_processes": other_processes_cpu(),
        "model": model.describe(),
        "photo": {
            "file": photo.filename,
            "megapixels": round(photo.megapixels, 2),
            "kb": len(photo.data) // 1024,
        },
        "requests": args.requests,
    }
    empty, baseline, adds = await baseline_and_adds(run)
    results |= {"empty_gallery": empty, "baseline": baseline}
    results["sizes"] = [await at_size(run, entries, baseline) for entries in sorted(args.sizes)]
    results["adds"] = adds
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def _sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) <= BASELINE_ENTRIES:
        raise argparse.ArgumentTypeError(f"sizes must be entry counts above {BASELINE_ENTRIES}, got {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fewshot.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = parser.add_argument_group("what is measured")
    run.add_argument(
        "--sizes",
        type=_sizes,
        default=list(DEFAULT_SIZES),
        help="gallery entries to measure, comma-separated (default 10000,100000)",
    )
    run.add_argument(
        "--requests",
        type=int,
        default=200,
        help="measured requests of each kind (gallery, classifier) per size, at concurrency 1 (default 200)",
    )
    run.add_argument(
        "--clients", type=int, default=8, help="concurrent /predict clients during the adds (default 8)"
    )
    run.add_argument(
        "--adds", type=int, default=1000, help="real photos added through the API under load (default 1000)"
    )
    run.add_argument("--add-batch", type=int, default=10, help="images per add request (default 10)")
    model = parser.add_argument_group("the model (default: the ImageNet EfficientNet-Lite0, exported fresh)")
    model.add_argument("--model-repository", type=Path, help="serve a model of this repository instead")
    model.add_argument("--model-name", help="with --model-repository: the model's directory name")
    model.add_argument("--model-version", type=int, default=1, help="with --model-repository (default 1)")
    model.add_argument(
        "--workdir",
        type=Path,
        help="keep the export, galleries and server logs here (default: a temporary directory)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=SCALE_RESULTS, help="results JSON path")
    output.add_argument("--doc", type=Path, default=DOC, help="Markdown file holding the generated block")
    output.add_argument("--no-doc", action="store_true", help="do not rewrite the docs block")
    output.add_argument(
        "--report-only", action="store_true", help="rewrite the docs block from --out without measuring"
    )
    args = parser.parse_args(argv)
    if args.model_repository is not None and not args.model_name:
        parser.error("--model-repository needs --model-name")
    if min(args.requests, args.clients, args.adds, args.add_batch) < 1:
        parser.error("--requests, --clients, --adds and --add-batch must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for chatty in ("onnx_ir", "onnxscript", "torch.onnx"):  # the export logs every graph pass
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.report_only:
        results = read_json(args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="gallery-scale-") as name:
            workdir = args.workdir or Path(name)
            workdir.mkdir(parents=True, exist_ok=True)
            if args.model_repository is not None:
                model = served_model(args.model_repository, args.model_name, args.model_version)
            else:
                model = export_default(workdir)
            results = asyncio.run(measure(model, workdir, args))
        write_json(results, args.out)
    if not args.no_doc:
        replace_block(args.doc, render_scale(results), SCALE_BLOCK_START, SCALE_BLOCK_END)
    print(render_scale(results))


if __name__ == "__main__":
    main()
