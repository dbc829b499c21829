"""The PNG walker: chunks, the metadata they inflate to, and the raw row bytes of the image.

What each unit costs, and why, is in `budget`'s docstring.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from service.inference.decodecost.budget import (
    MAX_METADATA_BYTES,
    NS_INFLATE_BYTE,
    NS_PNG_CHUNK,
    NS_PNG_RAW_BYTE,
    Cost,
    DecodePlan,
    metadata_cost,
    ns,
    pixel_costs,
    refuse_exif,
    refuse_metadata,
    refuse_steps,
)

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_PIXEL_CHUNKS = frozenset([b"IHDR", b"PLTE", b"IDAT", b"IEND", b"fdAT", b"fcTL", b"acTL", b"tRNS"])
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


@dataclass(frozen=True)
class PngPlan(DecodePlan):
    chunks: int
    metadata: int
    exif: int
    raw_bytes: int

    kind = "PNG"

    def costs(self, size: tuple[int, int], mode: str) -> list[Cost]:
        return [
            Cost(
                ns(self.chunks, NS_PNG_CHUNK),
                0,
                f"{self.chunks:,} chunks",
                "re-save it with a standard encoder",
            ),
            metadata_cost(self.metadata, self.exif, 0, "PNG"),
            Cost(ns(self.metadata, NS_INFLATE_BYTE), 0, "inflating its text", "strip the metadata"),
            Cost(ns(self.raw_bytes, NS_PNG_RAW_BYTE), 0, f"{self.raw_bytes:,} bytes of rows", "downscale it"),
            pixel_costs(size, mode),
        ]


def _png_raw_bytes(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Filter bytes and samples the decoder inflates and unfilters."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if columns:
            total += rows * (1 + -(-columns * bits_per_pixel // 8))
    return total


def _inflated_metadata(kind: bytes, body: bytes, room: int) -> int:
    """Bytes a zTXt, iTXt or iCCP chunk inflates to, up to `room` + 1 (the work is bounded by `room`)."""
    key_end = body.find(b"\x00")
    if kind == b"iTXt":
        compressed = body[key_end + 1 : key_end + 2] == b"\x01"
        rest = body[key_end + 3 :]
        for _ in range(2):  # language tag, translated keyword
            rest = rest[rest.find(b"\x00") + 1 :]
        if not compressed:
            return len(rest)
        stream = rest
    else:
        stream = body[key_end + 2 :]
    try:
        inflater = zlib.decompressobj()
        return len(inflater.decompress(stream, room + 1))
    except zlib.error:
        return len(body)  # Pillow ignores a broken stream; its bytes are still read


def inspect_png(data: bytes, name: str) -> PngPlan:
    pos, chunks, metadata, exif, raw = 8, 0, 0, 0, 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        chunks += 1
        refuse_steps(chunks, "chunks", name, "PNG", "re-save it with a standard encoder")
        if kind == b"IEND":
            break
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", body)
            raw = _png_raw_bytes(width, height, depth * _PNG_CHANNELS.get(colour, 4), interlace == 1)
        elif kind in (b"zTXt", b"iTXt", b"iCCP"):
            size = _inflated_metadata(kind, body, MAX_METADATA_BYTES - metadata)
            metadata += size
            if body.startswith(b"Raw profile type exif\x00"):
                exif += size // 2
        elif kind not in _PNG_PIXEL_CHUNKS:
            metadata += length
            if kind == b"eXIf":
                exif += length
            elif body.startswith(b"Raw profile type exif\x00"):
                exif += length // 2
        refuse_metadata(metadata, name, "PNG")
        refuse_exif(exif, name, "PNG")
    return PngPlan(chunks, metadata, exif, raw)
