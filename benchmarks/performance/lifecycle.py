"""`python -m benchmarks.performance.lifecycle`: swap model versions under load and count what clients saw.

Against a real `python -m service` on a copy of a real model (the default ImageNet EfficientNet-Lite0),
while `--clients` clients post real JPEGs without pause:
- poll mode: `--swaps` new versions are published one after another (a complete directory renamed
  into place, as training does); for each, the time from publishing until a request is answered by
  it, next to the server's own load time (session + warmup) and the poll interval;
- explicit mode: `--loads` versions loaded through `POST /v2/repository/models/<m>/load`; for each,
  how long the call took; the server's RSS after the first and after the last swap;
and in both, every response's status and the version that answered (zero non-200 expected).
Prints a summary and writes JSON (`--output`). Traffic goes to 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common.corpus import Photo, build_corpus
from benchmarks.common.processes import ServerProcess, free_port, python_module_command, rss_mb
from benchmarks.common.promtext import scrape
from modelcontract import MODEL_FILENAME
from service.models import registry

log = logging.getLogger(__name__)
MODEL = "imagenet"
WAIT_S = 180.0
ADMIN_TOKEN = secrets.token_hex(16)
"""A fresh admin token per run for the servers this benchmark starts (explicit mode requires one)."""


@dataclass
class Answers:
    """(status, version or None, monotonic time) of every response, in completion order."""

    rows: list[tuple[int, int | None, float]] = field(default_factory=list)

    def first_from(self, version: int, after: float) -> float | None:
        times = [t for _, v, t in self.rows if v == version and t >= after]
        return min(times) if times else None

    def summary(self, existed: set[int]) -> dict[str, Any]:
        statuses = Counter(status for status, _, _ in self.rows)
        versions = Counter(version for _, version, _ in self.rows if version is not None)
        return {
            "requests": len(self.rows),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "non_200": sum(v for k, v in statuses.items() if k != 200),
            "versions_answering": {str(k): v for k, v in sorted(versions.items())},
            "versions_that_never_existed": sorted(set(versions) - existed),
        }


async def _clients(url: str, photos: list[Photo], count: int, answers: Answers, stop: asyncio.Event) -> None:
    async def one(session: aiohttp.ClientSession, offset: int) -> None:
        index = offset
        while not stop.is_set():
            photo = photos[index % len(photos)]
            index += 1
            form = aiohttp.FormData()
            form.add_field("image", photo.data, filename=photo.filename, content_type="image/jpeg")
            try:
                async with session.post(f"{url}/predict", params={"model": MODEL}, data=form) as response:
                    body = await response.read()
                    version = json.loads(body)["model"]["version"] if response.status == 200 else None
                    answers.rows.append((response.status, version, time.monotonic()))
            except (aiohttp.ClientError, TimeoutError):
                answers.rows.append((0, None, time.monotonic()))

    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=count)) as session:
        await asyncio.gather(*(one(session, i) for i in range(count)))


def _publish(root: Path, version: int, source: Path) -> None:
    staging = root / MODEL / f".staging-{version}"
    staging.mkdir(parents=True)
    shutil.copy(source, staging / MODEL_FILENAME)
    staging.rename(root / MODEL / str(version))


async def _served(session: aiohttp.ClientSession, url: str) -> list[int]:
    async with session.get(f"{url}/readyz") as response:
        body = await response.json()
    return list(body.get("models", {}).get(MODEL, [])) if response.status == 200 else []


async def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _load_seconds(url: str) -> tuple[float, float]:
    """Total seconds the server spent loading versions (session + warmup), and how many loads."""
    totals = (await scrape(url)).get("convserve_model_load_duration_seconds")
    return (totals.sum, totals.count) if totals else (0.0, 0.0)


async def _swap_phase(
    server: ServerProcess, root: Path, source: Path, args: argparse.Namespace, explicit: bool
) -> dict[str, Any]:
    url, answers, stop = server.url, Answers(), asyncio.Event()
    photos = build_corpus()
    load = asyncio.create_task(_clients(url, photos, args.clients, answers, stop))
    swaps, rss_after = [], []
    count = args.loads if explicit else args.swaps
    # The repository API (index, load) needs the admin token the server was started with.
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(timeout=timeout, headers=admin) as session:
        await asyncio.sleep(2.0)  # steady load before the first swap
        for version in range(2, count + 2):
            before_sum, before_count = await _load_seconds(url)
            _publish(root, version, source)
            published = time.monotonic()
            if explicit:
                async with session.post(f"{url}/v2/repository/models/{MODEL}/load") as response:
                    assert response.status == 200, await response.text()
                call_s = time.monotonic() - published
            await _wait(lambda v=version: _only(session, url, v), f"version {version} alone")
            await _wait(
                lambda v=version, p=published: _reached(answers, v, p), f"an answer from version {version}"
            )
            first = answers.first_from(version, published)
            after_sum, after_count = await _load_seconds(url)
            row = {
                "version": version,
                "publish_to_first_answer_s": round((first or published) - published, 3),
                "server_load_s": round(after_sum - before_sum, 3) if after_count > before_count else None,
            }
            if explicit:
                row["load_call_s"] = round(call_s, 3)
            swaps.append(row)
            rss_after.append(round(rss_mb(server.pid), 1))
            log.info("swap to version %d: %s, RSS %.0f MiB", version, row, rss_after[-1])
    stop.set()
    await load
    return {
        "mode": "explicit" if explicit else "poll",
        "clients": args.clients,
        "swaps": swaps,
        "rss_mib_after_each_swap": rss_after,
        "rss_ratio_last_to_first": round(rss_after[-1] / rss_after[0], 3),
        **answers.summary(set(range(1, count + 2))),
    }


async def _only(session: aiohttp.ClientSession, url: str, version: int) -> bool:
    """`version` alone is served and the one before it is fully released (not still draining)."""
    if await _served(session, url) != [version]:
        return False
    async with session.post(f"{url}/v2/repository/index") as response:
        states = {int(entry["version"]): entry["state"] for entry in await response.json()}
    return states.get(version - 1) == "UNAVAILABLE"


async def _reached(answers: Answers, version: int, after: float) -> bool:
    return answers.first_from(version, after) is not None


def _server(root: Path, mode: str, args: argparse.Namespace, logs: Path) -> ServerProcess:
    port = free_port()
    env = {
        "CONVSERVE_MODEL_REPOSITORY": str(root),
        "CONVSERVE_PROVIDERS": "cpu",
        "CONVSERVE_HOST": "127.0.0.1",
        "CONVSERVE_PORT": str(port),
        "CONVSERVE_MODEL_CONTROL": mode,
        "CONVSERVE_REPOSITORY_POLL_S": str(args.poll_s),
        "CONVSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    return ServerProcess(f"service-{mode}", python_module_command("service"), env, port, logs / f"{mode}.log")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    source = args.model
    results: dict[str, Any] = {"model_file": str(source), "poll_s": args.poll_s}
    with tempfile.TemporaryDirectory(prefix="convserve-lifecycle-") as work:
        for mode in ("poll", "explicit"):
            root = Path(work) / mode
            _publish(root, 1, source)
            with _server(root, mode, args, Path(work)) as server:
                results[mode] = await _swap_phase(server, root, source, args, explicit=mode == "explicit")
                results[mode]["startup_s"] = server.startup_s
            results[mode]["warmup_log"] = _load_lines((Path(work) / f"{mode}.log").read_text())[:2]
    return results


def _load_lines(log_text: str) -> list[str]:
    """The registry's "model … loaded in …" lines of a server log, without the logger's prefix.

    The prefix is the registry's logger name, taken from the module: a moved registry keeps it found."""
    prefix = f"{registry.logger.name}: "
    return [
        line.split(prefix, 1)[1]
        for line in log_text.splitlines()
        if f"{prefix}model" in line and "loaded in" in line
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.performance.lifecycle", description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/efficientnet_lite0_imagenet/1/model.onnx"))
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--swaps", type=int, default=10, help="versions published in poll mode (default 10)")
    parser.add_argument(
        "--loads", type=int, default=20, help="explicit loads (default 20, for the RSS check)"
    )
    parser.add_argument("--poll-s", type=float, default=1.0, help="CONVSERVE_REPOSITORY_POLL_S (default 1)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/lifecycle.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = asyncio.run(run(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
