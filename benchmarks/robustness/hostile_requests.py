"""Hostile requests that are cheap to send and may be costly to serve, by class, and how each is sent.

Where `hostile_inputs` holds files for `/predict`, these are whole HTTP requests:
- request_head: a multi-MB header, and thousands of headers, to `GET /healthz`; each head is
  trickled (`TrickledHead`: raw socket writes of `chunk_bytes` with a pause after each), so the
  server really reads it piece by piece, as a slow attacker sends it;
- parse_amplification: gzip bodies of some 30 KB that inflate to `inflated_bytes` of numbers or of
  `{}` objects, as `/predict` JSON (`{"inputs": [...]}`) and as V2 infer `"data"`;
- response_amplification: a V2 infer request for one valid image tensor that lists its output
  `repeated_outputs` times (as JSON data, then as Triton's classification strings);
- image_decode: the files of `hostile_inputs` named in `IMAGE_CASES` (one per decode-cost family),
  as uploads;
- costly_legal_images: the cost probes named in `LEGAL_IMAGE_CASES`, files at or past the decode
  limits that are legal work within the per-image budget (the heaviest costs ~0.3 s of one core);
- admin_refusal: the repository API without a token, with a wrong one, and from another site's page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from benchmarks.common.loadgen import error_kind
from benchmarks.robustness.hostile_inputs import HostileCase, cost_probes, hostile_cases

CLASSES: Mapping[str, str] = {
    "request_head": "a multi-MB header, then thousands of headers; each head trickled in small chunks",
    "parse_amplification": "small gzip JSON bodies inflating to tens of MB of numbers or of `{}`",
    "response_amplification": "a V2 infer request listing its output many times",
    "image_decode": "image files that cost more to decode than their size says (one per family)",
    "costly_legal_images": "legal images at the decode limits (4-MP 16-bit PNG, 40-MP JPEG)",
    "admin_refusal": "the repository API without a token, with a wrong one, and cross-site",
}
IMAGE_CASES = (
    # decode_cost_cases(): one file per family whose decode costs more than its pixel count says
    "jpeg_progressive_200_scans",
    "jpeg_progressive_1000_scans",
    "jpeg_progressive_40mp_444",
    "jpeg_sequential_multiscan_40mp",
    "jpeg_arithmetic_200_scans",
    "jpeg_dense_40mp_cmyk",
    "jpeg_lossless_40mp",
    "jpeg_lossless_512",
    "jpeg_12bit",
    "jpeg_header_fill_1mb",
    "jpeg_exif_80_segments",
    "jpeg_fill_run_13mb",
    "png_text_bomb",
    "png_100k_chunks",
    "png_exif_65000_tags",
    "png_exif_5000_tags",
    "png_gray16_2048",
    "gif_lzw_clear_codes_20mb",
    "gif_comment_10mb",
    "webp_300k_frames",
    "bmp_rle8_2mb_of_deltas",
)
"""`hostile_inputs` cases the image class sends, in turn; a name the corpus does not hold (yet) is
skipped and reported missing. Add a new family here by name."""
LEGAL_IMAGE_CASES = (
    # cost_probes(): legal files at or beyond the decode limits
    "png_2048x2048_rgba16_paeth",
    "png_2048x2048_black",
    "jpeg_8000x5000_flat",
    "png_6000x6000_black",
)
"""Cost probes the costly-legal-images class sends: what any client may ask for within the budgets."""
ATTACKER_ORIGIN = "https://attacker.example"


@dataclass(frozen=True)
class HostileSizes:
    header_value_bytes: int = 2 * 2**20
    header_count: int = 5000
    chunk_bytes: int = 1024
    """A trickled head is written this many bytes at a time…"""
    chunk_pause_s: float = 0.001
    """…with this pause after each write, so each piece reaches the server as a read of its own."""
    inflated_bytes: int = 32 * 2**20
    """Size of a gzip body once inflated (under the default 64 MiB upload limit, so it gets parsed)."""
    repeated_outputs: int = 1000


@dataclass(frozen=True)
class V2Target:
    """The served model as V2 requests name it (these defaults when the server publishes no metadata)."""

    model: str = "model"
    input_name: str = "input"
    input_shape: tuple[int, ...] = (3, 224, 224)
    output_name: str = "logits"
    discovered: bool = False


@dataclass(frozen=True)
class HttpRequest:
    label: str
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class TrickledHead:
    label: str
    head: bytes


HostileRequest = HttpRequest | TrickledHead


def upload(case: HostileCase) -> HttpRequest:
    """A `hostile_inputs` case as its raw multipart request (file names exactly as given)."""
    body, content_type = case.multipart()
    return HttpRequest(case.name, "POST", "/predict", {"Content-Type": content_type}, body)


def image_cases(names: tuple[str, ...] | None = None) -> tuple[list[HostileCase], list[str]]:
    """The cases of `names` (default: `IMAGE_CASES` and `LEGAL_IMAGE_CASES`) the corpus holds, and the
    names it does not."""
    names = (*IMAGE_CASES, *LEGAL_IMAGE_CASES) if names is None else names
    known = {case.name: case for case in [*hostile_cases(), *cost_probes()]}
    return [known[name] for name in names if name in known], [n for n in names if n not in known]


def _heads(sizes: HostileSizes) -> list[HostileRequest]:
    # Connection: close, so a server without head limits answers 200 once the head is complete and closes.
    start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    filler = b"X-Filler: " + b"a" * sizes.header_value_bytes + b"\r\n"
    many = b"".join(b"X-Pad-%05d: %d\r\n" % (index, index) for index in range(sizes.header_count))
    return [
        TrickledHead(f"header_{sizes.header_value_bytes >> 10}_kib", start + filler + b"\r\n"),
        TrickledHead(f"headers_{sizes.header_count}", start + many + b"\r\n"),
    ]


def gzip_json_list(prefix: bytes, item: bytes, suffix: bytes, inflated_bytes: int) -> bytes:
    """gzip of `prefix item,item,…,item suffix`, about `inflated_bytes` inflated, compressed piecewise."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip header and trailer
    piece = (item + b",") * max(1, min(2**20, inflated_bytes) // (len(item) + 1))
    parts = [compressor.compress(prefix)]
    parts += [compressor.compress(piece) for _ in range(max(1, inflated_bytes // len(piece)))]
    parts += [compressor.compress(item + suffix), compressor.flush()]
    return b"".join(parts)


def _parse_bombs(target: V2Target, sizes: HostileSizes) -> list[HostileRequest]:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    shape = ", ".join(str(size) for size in (1, *target.input_shape))
    v2_prefix = (
        f'{{"inputs": [{{"name": "{target.input_name}", "datatype": "FP32", "shape": [{shape}], "data": ['
    )
    requests: list[HostileRequest] = []
    for item, kind in ((b"0", "numbers"), (b"{}", "objects")):
        predict = gzip_json_list(b'{"inputs": [', item, b"]}", sizes.inflated_bytes)
        v2 = gzip_json_list(v2_prefix.encode(), item, b"]}]}", sizes.inflated_bytes)
        requests += [
            HttpRequest(f"predict_gzip_{kind}", "POST", "/predict", headers, predict),
            HttpRequest(f"v2_gzip_{kind}", "POST", f"/v2/models/{target.model}/infer", headers, v2),
        ]
    return requests


def _repeated_outputs(target: V2Target, sizes: HostileSizes) -> list[HostileRequest]:
    tensor = np.zeros((1, *target.input_shape), dtype="<f4").tobytes()
    requests: list[HostileRequest] = []
    for kind, parameters in (("json", {"binary_data": False}), ("classification", {"classification": 1000})):
        header = _compact_json(
            {
                "inputs": [
                    {
                        "name": target.input_name,
                        "datatype": "FP32",
                        "shape": [1, *target.input_shape],
                        "parameters": {"binary_data_size": len(tensor)},
                    }
                ],
                "outputs": [{"name": target.output_name, "parameters": parameters}] * sizes.repeated_outputs,
            }
        )
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
        path = f"/v2/models/{target.model}/infer"
        label = f"outputs_{kind}_x{sizes.repeated_outputs}"
        requests.append(HttpRequest(label, "POST", path, headers, header + tensor))
    return requests


def _admin_requests(target: V2Target) -> list[HostileRequest]:
    wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
    # What a page on another site can make a browser send: a "simple" POST, no preflight.
    browser = {"Origin": ATTACKER_ORIGIN, "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"}
    model = f"/v2/repository/models/{target.model}"
    return [
        HttpRequest("index_no_token", "POST", "/v2/repository/index", {}),
        HttpRequest("index_wrong_token", "POST", "/v2/repository/index", wrong),
        HttpRequest("load_cross_site", "POST", f"{model}/load", browser, b"{}"),
        HttpRequest("unload_cross_site_wrong_token", "POST", f"{model}/unload", {**browser, **wrong}, b"{}"),
    ]


def requests_for(class_name: str, target: V2Target, sizes: HostileSizes) -> list[HostileRequest]:
    """The requests one hostile client of `class_name` cycles through."""
    if class_name == "request_head":
        return _heads(sizes)
    if class_name == "parse_amplification":
        return _parse_bombs(target, sizes)
    if class_name == "response_amplification":
        return _repeated_outputs(target, sizes)
    if class_name == "image_decode":
        return [upload(case) for case in image_cases(IMAGE_CASES)[0]]
    if class_name == "costly_legal_images":
        return [upload(case) for case in image_cases(LEGAL_IMAGE_CASES)[0]]
    if class_name == "admin_refusal":
        return _admin_requests(target)
    raise ValueError(f"unknown hostile class {class_name!r}; choose from {list(CLASSES)}")


def _compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def send_http(
    session: aiohttp.ClientSession, base_url: str, request: HttpRequest
) -> tuple[int | None, str | None]:
    """Send one request and read the whole answer: (status, None) or (None, error kind)."""
    try:
        async with session.request(
            request.method, base_url + request.path, data=request.body, headers=dict(request.headers)
        ) as response:
            await response.read()
            return response.status, None
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, error_kind(exc)


async def send_trickled(
    host: str, port: int, request: TrickledHead, sizes: HostileSizes, timeout_s: float
) -> tuple[int | None, str | None]:
    """Write the head piece by piece until it is all sent or the server answers; read the status."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError) as exc:
        return None, error_kind(exc)
    status_line = asyncio.ensure_future(reader.readline())
    try:
        for start in range(0, len(request.head), sizes.chunk_bytes):
            if status_line.done():
                break  # answered (431) before the head was complete
            writer.write(request.head[start : start + sizes.chunk_bytes])
            await writer.drain()
            await asyncio.sleep(sizes.chunk_pause_s)
    except OSError:
        pass  # closed on us mid-head: the answer it sent first, if any, is still in the reader
    try:
        line = await asyncio.wait_for(status_line, timeout_s)
    except (OSError, TimeoutError) as exc:
        return None, error_kind(exc)
    finally:
        status_line.cancel()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = line.split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1]), None
    return None, "closed_without_answer"
