"""The interference phase and its hostile requests, against real sockets and the tiny upload server."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from dataclasses import asdict

import pytest

from benchmarks.common.processes import LOOPBACK
from benchmarks.robustness import hostile_requests
from benchmarks.robustness.hostile_inputs import case_named
from benchmarks.robustness.hostile_requests import (
    CLASSES,
    HostileSizes,
    HttpRequest,
    TrickledHead,
    V2Target,
    gzip_json_list,
    image_cases,
    requests_for,
    send_trickled,
)
from benchmarks.robustness.interference import InterferencePlan, measure_interference
from tests.liveserver import ServiceProcess

SMALL = HostileSizes(
    header_value_bytes=64 * 1024,
    header_count=300,
    chunk_bytes=4096,
    chunk_pause_s=0.0005,
    inflated_bytes=256 * 1024,
    repeated_outputs=10,
)
WINDOW_KEYS = {
    "seconds",
    "normal_requests",
    "normal_statuses",
    "normal_latency_ms",
    "server_cpu_s",
    "rss_before_mb",
    "rss_growth_mb",
    "server_died",
}
CLASS_KEYS = WINDOW_KEYS | {
    "name",
    "description",
    "hostile_requests",
    "hostile_statuses",
    "hostile_by_request",
    "hostile_latency_ms",
    "hostile_error",
    "p99_ratio",
}
# The tiny server has no V2 routes and reads no JSON: it refuses these classes whatever they send.
REFUSED_BY_THE_TINY_SERVER = ("parse_amplification", "response_amplification", "admin_refusal")


def test_gzip_bodies_inflate_to_valid_json_of_the_planned_size() -> None:
    body = gzip_json_list(b'{"inputs": [', b"{}", b"]}", 3 * 2**20)
    inflated = gzip.decompress(body)
    assert len(body) < 20_000 and 3 * 2**20 <= len(inflated) < 3 * 2**20 + 2**20
    items = json.loads(inflated)["inputs"]
    assert items[0] == {} and len(items) == inflated.count(b"{}")


def test_every_class_builds_its_requests() -> None:
    target = V2Target(model="pets", input_shape=(3, 8, 8))
    for name in CLASSES:
        requests = requests_for(name, target, SMALL)
        assert requests, name
        assert len({request.label for request in requests}) == len(requests), name
    with pytest.raises(ValueError, match="unknown hostile class"):
        requests_for("bogus", target, SMALL)


def test_repeated_outputs_header_declares_its_length_and_every_output() -> None:
    target = V2Target(model="pets", input_shape=(3, 8, 8))
    request = requests_for("response_amplification", target, SMALL)[0]
    assert isinstance(request, HttpRequest) and request.path == "/v2/models/pets/infer"
    length = int(request.headers["Inference-Header-Content-Length"])
    header = json.loads(request.body[:length])
    assert len(header["outputs"]) == SMALL.repeated_outputs
    assert (
        len(request.body) - length == 4 * 3 * 8 * 8 == header["inputs"][0]["parameters"]["binary_data_size"]
    )


def test_image_classes_send_the_named_cases_and_report_missing_ones() -> None:
    present, missing = image_cases(("png_2048x2048_black", "no_such_family"))
    assert [case.name for case in present] == ["png_2048x2048_black"] and missing == ["no_such_family"]
    hostile, legal = (
        image_cases(hostile_requests.IMAGE_CASES)[0],
        image_cases(hostile_requests.LEGAL_IMAGE_CASES)[0],
    )
    assert {case.name for case in hostile}.isdisjoint(case.name for case in legal)
    assert [case.name for case in image_cases()[0]] == [case.name for case in [*hostile, *legal]]


def test_trickled_head_arrives_in_pieces_and_stops_when_answered() -> None:
    pause_s, chunk, answer_after = 0.02, 1024, 8 * 1024
    head = TrickledHead("big", b"GET / HTTP/1.1\r\nX-Filler: " + b"a" * 2**20)
    received: list[int] = []
    client_closed = asyncio.Event()

    async def answer_431_then_count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        with contextlib.suppress(ConnectionResetError):
            while data := await reader.read(65536):
                if total < answer_after <= total + len(data):
                    writer.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
                total += len(data)
        received.append(total)  # the client has closed, having read the answer
        client_closed.set()
        writer.close()

    async def run() -> tuple[tuple[int | None, str | None], float]:
        server = await asyncio.start_server(answer_431_then_count, LOOPBACK, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            started = time.monotonic()
            result = await send_trickled(
                LOOPBACK, port, head, HostileSizes(chunk_bytes=chunk, chunk_pause_s=pause_s), 30.0
            )
            elapsed = time.monotonic() - started
            # Bounded for a broken build only: a client that never closes fails here, not by hanging.
            await asyncio.wait_for(client_closed.wait(), timeout=30)
            return result, elapsed

    result, elapsed = asyncio.run(run())
    assert result == (431, None)
    # The 8th KiB exists only after the client has paused 7 times: the head was trickled.
    assert elapsed >= 7 * pause_s
    assert received and received[0] < len(head.head) // 2  # it stopped writing once answered


def test_interference_phase_records_every_key(tiny_server: ServiceProcess) -> None:
    plan = InterferencePlan(
        normal_requests=5, min_window_s=0.5, window_s=10.0, request_timeout_s=10.0, sizes=SMALL
    )
    result = asyncio.run(
        measure_interference(
            lambda: contextlib.nullcontext(tiny_server), case_named("reference_jpeg_2mp"), plan
        )
    )
    assert set(result) == {
        "reference",
        "plan",
        "hostile_client_nice",
        "v2_target",
        "image_cases",
        "image_cases_missing",
        "idle",
        "classes",
        "server_restarted_before",
    }
    assert result["v2_target"] == asdict(V2Target())  # the tiny server publishes no V2 metadata
    assert set(result["idle"]) == WINDOW_KEYS
    assert result["idle"]["normal_statuses"] == {"200": result["idle"]["normal_requests"]}
    assert [row["name"] for row in result["classes"]] == list(CLASSES)
    for row in result["classes"]:
        assert set(row) == CLASS_KEYS, row["name"]
        assert row["hostile_error"] is None and row["hostile_requests"] >= 1, row
        assert (
            sum(sum(counts.values()) for counts in row["hostile_by_request"].values())
            == row["hostile_requests"]
        )
        assert row["normal_statuses"] == {"200": row["normal_requests"]}, row
        assert row["p99_ratio"] is not None and row["server_cpu_s"] is not None
        if row["name"] in REFUSED_BY_THE_TINY_SERVER:
            assert all(400 <= int(status) < 500 for status in row["hostile_statuses"]), row
    assert result["server_restarted_before"] == []
