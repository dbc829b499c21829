"""What decoding an uploaded image costs, read from its bytes before Pillow decodes it, and the budget.

The declared pixel area does not bound the cost of a decode: segments, scans, chunks, metadata and
run-length codes do too. `inspect` reads a file's structure (bounded walks, no pixel), refusing what is
over a structural limit, and `check` estimates the decode at the size it will be decoded at from the
worst per-unit costs, refusing anything over `MAX_DECODE_CPU_S` or `MAX_WORKING_BYTES` with a 422
before Pillow decodes it.

`budget` holds the measured cost model (its docstring has the table), the limits and the check; `jpeg`,
`png`, `gif`, `webp` and `bmp` each walk one format's structure into a plan that prices itself.
"""

from __future__ import annotations

import struct

from service.errors import InvalidInputError
from service.inference.decodecost.bmp import BmpPlan, inspect_bmp
from service.inference.decodecost.budget import (
    MAX_CONTAINER_STEPS,
    MAX_DECODE_CPU_S,
    MAX_EXIF_BYTES,
    MAX_JPEG_FILL_RUN,
    MAX_JPEG_SCANS,
    MAX_JUNK_BYTES,
    MAX_METADATA_BYTES,
    MAX_WORKING_BYTES,
    Cost,
    DecodePlan,
    MiB,
    check,
    pixel_costs,
)
from service.inference.decodecost.gif import GifPlan, inspect_gif
from service.inference.decodecost.jpeg import JpegFrame, JpegPlan, inspect_jpeg
from service.inference.decodecost.png import PngPlan, inspect_png
from service.inference.decodecost.webp import WebpPlan, inspect_webp

__all__ = [
    "MAX_CONTAINER_STEPS",
    "MAX_DECODE_CPU_S",
    "MAX_EXIF_BYTES",
    "MAX_JPEG_FILL_RUN",
    "MAX_JPEG_SCANS",
    "MAX_JUNK_BYTES",
    "MAX_METADATA_BYTES",
    "MAX_WORKING_BYTES",
    "BmpPlan",
    "Cost",
    "DecodePlan",
    "GifPlan",
    "JpegFrame",
    "JpegPlan",
    "MiB",
    "PngPlan",
    "WebpPlan",
    "check",
    "inspect",
    "pixel_costs",
]


def inspect(data: bytes, name: str) -> DecodePlan:
    """The plan for `data`, by its signature, as Pillow will pick its plugin.

    Raises `InvalidInputError` for structure that is over a limit before any pixel (too much
    metadata, too many segments or scans, junk), or that cannot be read: Pillow or libjpeg would
    refuse such a file too, and a plan without its counts would skip the budget. Files in no
    accepted format get a plain plan: Pillow refuses them at once.
    """
    try:
        if data[:3] == b"\xff\xd8\xff":
            return inspect_jpeg(data, name)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return inspect_png(data, name)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return inspect_webp(data, name)
        if data[:2] == b"BM":
            return inspect_bmp(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return inspect_gif(data, name)
    except (struct.error, IndexError) as exc:
        raise InvalidInputError(
            f"{name}: the structure of this file cannot be read ({exc}); re-save it with a standard encoder"
        ) from exc
    return DecodePlan()
