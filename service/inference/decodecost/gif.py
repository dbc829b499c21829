"""The GIF walker: blocks before the first frame as Pillow walks them, and that frame's LZW data.

What each unit costs, and why, is in `budget`'s docstring.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from service.errors import InvalidInputError
from service.inference.decodecost.budget import (
    MAX_JUNK_BYTES,
    METADATA_COPIES,
    NS_GIF_BYTE,
    NS_GIF_STEP,
    NS_JUNK_BYTE,
    Cost,
    DecodePlan,
    junk_error,
    ns,
    pixel_costs,
    refuse_metadata,
    refuse_steps,
)

_GIF_BLOCK = re.compile(rb"[!,;]")


@dataclass(frozen=True)
class GifPlan(DecodePlan):
    steps: int
    junk: int
    metadata: int
    coded_bytes: int

    kind = "GIF"

    def costs(self, size: tuple[int, int], mode: str) -> list[Cost]:
        return [
            Cost(
                ns(self.steps, NS_GIF_STEP) + ns(self.junk, NS_JUNK_BYTE),
                METADATA_COPIES * self.metadata,
                f"{self.steps:,} extension blocks",
                "re-save it without comments or extensions",
            ),
            Cost(
                ns(self.coded_bytes, NS_GIF_BYTE),
                0,
                f"{self.coded_bytes:,} bytes of LZW data",
                "downscale it",
            ),
            pixel_costs(size, mode),
        ]


def inspect_gif(data: bytes, name: str) -> GifPlan:
    """Walk the blocks before the first frame as Pillow does (it decodes that frame only)."""
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    steps, junk, metadata = 0, 0, 0
    while (block := _GIF_BLOCK.search(data, pos, pos + MAX_JUNK_BYTES - junk + 1)) is not None:
        junk += block.start() - pos  # Pillow steps over other bytes one at a time
        if block[0] != b"!":
            pos = block.end()
            break  # the first frame (or the trailer): Pillow's LZW decoder takes over
        label, pos = data[block.start() + 1], block.start() + 2
        while pos < len(data) and data[pos]:  # sub-blocks, up to the empty terminator
            steps += 1
            metadata += data[pos] if label == 0xFE else 0
            pos += 1 + data[pos]
        pos += 1
        refuse_steps(steps, "extension sub-blocks", name, "GIF", "re-save it without comments or extensions")
        refuse_metadata(metadata, name, "GIF")
    if block is None and len(data) - pos > MAX_JUNK_BYTES - junk + 1:
        raise junk_error(name, "GIF", "between its blocks")
    coded = _first_frame_lzw_bytes(data, pos, name) if block is not None and block[0] == b"," else 0
    return GifPlan(steps, junk, metadata, coded)


def _first_frame_lzw_bytes(data: bytes, pos: int, name: str) -> int:
    """The LZW bytes of the first frame (its descriptor starts at `pos`); 422 past what its pixels use.

    Every LZW code draws at least one pixel, except clear codes, which encoders send once per 4,096
    codes at most, and a code is at most 12 bits: a frame of P pixels needs under 1.5 P bytes. Pillow
    decodes until the frame's data ends, so 20 MB of clear codes over a tiny frame cost 0.1 s and end
    as "truncated"; the walk stops as soon as the frame's data passes `2 P + 64 KiB`.
    """
    if len(data) < pos + 10:
        return 0
    width, height, flags = struct.unpack_from("<HHB", data, pos + 4)
    pos += 9 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1  # descriptor, colour table, code size
    limit, coded = 2 * width * height + 65_536, 0
    while pos < len(data) and data[pos]:
        coded += data[pos]
        pos += 1 + data[pos]
        if coded > limit:
            raise InvalidInputError(
                f"{name}: the first frame of this GIF ({width}x{height}) carries more than {limit:,} bytes "
                "of LZW data, more than its pixels can use; re-save it with a standard encoder"
            )
    return coded
