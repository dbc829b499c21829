"""Which protocol a client should use: the same photos through REST `/predict`, V2 REST and V2 gRPC.

One service process (the default settings, gRPC on its own port) answers each kind of request in
turn, at concurrency 1 (what a lone request costs) and 32 (throughput): multipart uploads to
`/predict` (top 5), V2 REST and gRPC with the encoded JPEG as the `image` BYTES input (top 5 as
Triton's classification output), and V2 gRPC with the FP32 tensor preprocessed by the client (the
tensor is made once per photo before the run, so its cost is not the server's, and it is ~50x the
JPEG's bytes on the wire). Each row carries the server's CPU per image: what a protocol costs the
server beyond the model and the decode it may skip.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import tritonclient.grpc.aio as grpc_client
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from benchmarks.common.corpus import Photo
from benchmarks.common.loadgen import Send, Transport, Window, client_session, error_kind
from benchmarks.common.processes import ServerProcess
from benchmarks.performance.server_bench import ServerBench
from benchmarks.performance.subjects import RunConfig, ServedModel, service_process
from modelcontract import ModelMetadata
from service.inference.preprocessing import ImagePreprocessor
from training.modelfile import read_metadata

PROTOCOL_LEVELS = (1, 32)
TOP_K = 5
PROTOCOL_TITLES = {
    "predict": "REST `/predict`, JPEG as multipart",
    "v2_rest_jpeg": "V2 REST, JPEG as `image` BYTES (binary)",
    "grpc_jpeg": "V2 gRPC, JPEG as `image` BYTES",
    "grpc_fp32": "V2 gRPC, FP32 tensor (client preprocessed)",
}
# gRPC status names as the HTTP statuses the load generator counts (refused = 503, lost = the rest).
_GRPC_AS_HTTP = {"StatusCode.UNAVAILABLE": 503, "StatusCode.RESOURCE_EXHAUSTED": 429}


def _bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def v2_rest_images(url: str, model: str, output: str) -> Transport:
    """Each photo as the one element of the `image` input, as binary data after the JSON header."""
    infer_url = f"{url}/v2/models/{model}/infer"

    async def send(session: aiohttp.ClientSession, photo: Photo) -> tuple[int | None, str | None]:
        raw = _bytes_element(photo.data)
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "outputs": [{"name": output, "parameters": {"classification": TOP_K}}],
            }
        ).encode()
        headers = {"Inference-Header-Content-Length": str(len(header))}
        try:
            async with session.post(infer_url, data=header + raw, headers=headers) as response:
                await response.read()
                return response.status, None
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, error_kind(exc)

    @asynccontextmanager
    async def connect(connections: int, timeout_s: float) -> AsyncIterator[Send]:
        async with client_session(connections, timeout_s) as session:
            yield functools.partial(send, session)

    return connect


def grpc_transport(
    address: str, model: str, output: str, make_input: Callable[[Photo], InferInput]
) -> Transport:
    """`tritonclient.grpc.aio` on one channel (HTTP/2 carries every concurrent call), top 5 asked."""

    @asynccontextmanager
    async def connect(connections: int, timeout_s: float) -> AsyncIterator[Send]:
        client = grpc_client.InferenceServerClient(url=address)
        outputs = [InferRequestedOutput(output, class_count=TOP_K)]

        async def send(photo: Photo) -> tuple[int | None, str | None]:
            try:
                await client.infer(model, [make_input(photo)], outputs=outputs, client_timeout=timeout_s)
            except InferenceServerException as exc:
                status = exc.status() or ""
                if status == "StatusCode.DEADLINE_EXCEEDED":
                    return None, "TimeoutError"
                return _GRPC_AS_HTTP.get(status, 500), None
            return 200, None

        try:
            yield send
        finally:
            await client.close()

    return connect


def jpeg_input(photo: Photo) -> InferInput:
    tensor = InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([photo.data], dtype=np.object_))
    return tensor


def tensor_inputs(
    photos: Sequence[Photo], metadata: ModelMetadata, input_name: str
) -> Callable[[Photo], InferInput]:
    """FP32 inputs made ahead of the run with the server's own preprocessing, one per photo."""
    preprocess = ImagePreprocessor.from_metadata(metadata)
    tensors = {photo.filename: preprocess(photo.data, photo.filename)[np.newaxis] for photo in photos}

    def make(photo: Photo) -> InferInput:
        tensor = InferInput(input_name, list(tensors[photo.filename].shape), "FP32")
        tensor.set_data_from_numpy(tensors[photo.filename])
        return tensor

    return make


def transports(
    server: ServerProcess, grpc_port: int, model: str, metadata: ModelMetadata, photos: Sequence[Photo]
) -> dict[str, str | Transport]:
    address = f"{server.url.split('://', 1)[1].rsplit(':', 1)[0]}:{grpc_port}"
    output = metadata.output_name
    return {
        "predict": f"{server.url}/predict?top_k={min(TOP_K, metadata.num_classes)}",
        "v2_rest_jpeg": v2_rest_images(server.url, model, output),
        "grpc_jpeg": grpc_transport(address, model, output, jpeg_input),
        "grpc_fp32": grpc_transport(
            address, model, output, tensor_inputs(photos, metadata, metadata.input_name)
        ),
    }


async def bench_protocols(
    config: RunConfig, model: ServedModel, photos: Sequence[Photo], timing: Window, log_dir: Path
) -> ServerBench:
    """The service with the default settings, answering each protocol in turn at every level of
    `PROTOCOL_LEVELS`; each row says which protocol in `protocol`."""
    metadata = read_metadata(model.path)
    with service_process(config, model, log_dir, "protocols") as server:
        grpc_port = int(server.env["CONVSERVE_GRPC_PORT"])
        bench = ServerBench("protocols", server, photos)
        for protocol, target in transports(server, grpc_port, model.name, metadata, photos).items():
            for level in PROTOCOL_LEVELS:
                row = await bench.measure(target, level, timing)
                row["protocol"] = protocol
                row["server_cpu_ms_per_image"] = cpu_ms_per_image(row)
        return bench


def cpu_ms_per_image(row: Mapping[str, Any]) -> float | None:
    """Server CPU milliseconds per answered image: CPU percent (of one core) over images per second."""
    cpu, rate = row.get("server_cpu_percent"), row.get("img_per_s")
    if cpu is None or not rate:
        return None
    return round(10.0 * float(cpu) / float(rate), 2)


def protocol_rows(levels: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [row for row in levels if row.get("server") == "protocols"]


def protocol_table(levels: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown: one line per protocol, concurrency 1 and 32 side by side."""
    rows = protocol_rows(levels)
    if not rows:
        return []
    lines = [
        "| Protocol | c=1 p50 ms | c=1 p99 ms | c=32 img/s | c=32 p99 ms | server CPU ms/image (c=32) |",
        "|---|---|---|---|---|---|",
    ]

    def cell(value: Any) -> str:
        return "–" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)

    for protocol, title in PROTOCOL_TITLES.items():
        by_level = {row["level"]: row for row in rows if row.get("protocol") == protocol}
        alone, busy = by_level.get(1, {}), by_level.get(32, {})
        if not alone and not busy:
            continue
        lines.append(
            f"| {title} | {cell(alone.get('p50_ms'))} | {cell(alone.get('p99_ms'))} | "
            f"{cell(busy.get('img_per_s'))} | {cell(busy.get('p99_ms'))} | "
            f"{cell(busy.get('server_cpu_ms_per_image'))} |"
        )
    return lines
