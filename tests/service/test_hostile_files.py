"""The malformed-file corpus (benchmarks.hostile_inputs) against the real server and the real decoder.

Each case is sent as-is (raw multipart, hostile file names intact) to a real uvicorn serving the tiny
model and must get its expected status, with our JSON error for every refusal, while the server
stays ready. Then each case's files go through the ImageNet-default preprocessing (224 crop of a
256 resize) in a forked child, whose CPU time and peak-RSS growth (VmHWM, reset before the decode)
must stay under fixed bounds: about three times what the worst accepted file costs here, and far
below what these files cost before the limits existed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import re
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import pytest

from benchmarks.robustness.hostile_inputs import HostileCase, cost_probes, hostile_cases
from modelcontract.transform import EvalTransform
from service.errors import InvalidInputError
from service.inference.preprocessing import ImagePreprocessor
from tests.liveserver import LiveServer, live_server
from tests.tinymodel import DEFAULT_MAX_UPLOAD_BYTES, tiny_settings

# The cost probes are legal files at the edge of the decode limits (the worst that is accepted).
CASES = {case.name: case for case in [*hostile_cases(), *cost_probes()]}
IMAGENET_DEFAULT = ImagePreprocessor(
    EvalTransform(
        input_size=(224, 224), resize_size=256, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3
    )
)
# The worst accepted files, at the 2048x2048 decode limit, take ~0.27 s here (16-bit RGBA PNG rows)
# and ~47 MiB (16-bit gray PNG, its RGB image included); a normal 2-MP JPEG ~0.02 s. Before the
# limits a 71-byte 4000x1 PNG took 4.6 s and 3 GB; before the decode budget (service.inference.decodecost) a
# 7 KB progressive JPEG of 200 scans 1.5 s, a 67 KB PNG of compressed text 260 MiB.
CPU_SECONDS_PER_FILE = 0.5
PEAK_GROWTH_MIB_PER_FILE = 64.0
_HWM = re.compile(r"^VmHWM:\s+(\d+) kB", re.MULTILINE)


@pytest.fixture(scope="module")
def server(model_repository: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(
        model_repository,
        max_batch_size=8,
        max_queue_size=128,  # the 100-file case fits, as it does with the default 256
        max_upload_bytes=DEFAULT_MAX_UPLOAD_BYTES,  # the bombs' real worst case
    )
    with live_server(settings) as live:
        yield live


@pytest.mark.parametrize("name", CASES)
def test_every_hostile_file_gets_its_expected_status(server: LiveServer, name: str) -> None:
    case = CASES[name]
    body, content_type = case.multipart()
    response = httpx.post(
        f"{server.url}/predict", content=body, headers={"content-type": content_type}, timeout=60
    )
    assert response.status_code == case.expected_status, response.text
    if response.status_code == 200:
        assert len(response.json()["predictions"]) == len(case.files)
    else:
        assert isinstance(response.json()["error"], str)
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def _peak_kib() -> int:
    match = _HWM.search(Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1))


def _decode_in_child(case: HostileCase, results: Connection) -> None:
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before_kib, started = _peak_kib(), time.process_time()
    for _, data, _ in case.files:
        with contextlib.suppress(InvalidInputError):
            IMAGENET_DEFAULT(data)
    results.send((time.process_time() - started, (_peak_kib() - before_kib) / 1024))


@pytest.mark.parametrize("name", CASES)
def test_no_hostile_file_costs_more_than_a_fixed_budget_to_decode(name: str) -> None:
    case = CASES[name]
    receiver, sender = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_decode_in_child, args=(case, sender))
    child.start()
    assert receiver.poll(120), f"decoding {name} did not finish in 120 s"
    cpu_s, growth_mib = receiver.recv()
    child.join(10)
    files = len(case.files)
    assert cpu_s <= CPU_SECONDS_PER_FILE * files, f"{name}: {cpu_s:.2f} s of CPU"
    assert growth_mib <= PEAK_GROWTH_MIB_PER_FILE * files, f"{name}: peak RSS grew {growth_mib:.0f} MiB"
