"""The JPEG walker: segments as Pillow walks them, the frame's 8x8 blocks, and the scans libjpeg makes.

What each unit costs, and why, is in `budget`'s docstring.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

from service.errors import InvalidInputError
from service.inference.decodecost.budget import (
    JPEG_BLOCK_BYTES,
    MAX_JPEG_FILL_RUN,
    MAX_JPEG_SCANS,
    MAX_JUNK_BYTES,
    NS_JPEG_BLOCK_PASS,
    NS_JPEG_BLOCK_SEQUENTIAL,
    NS_JPEG_CODED_BYTE,
    NS_JPEG_OUTPUT_PIXEL,
    NS_JPEG_SEGMENT,
    NS_JUNK_BYTE,
    NS_LOSSLESS_SAMPLE,
    Cost,
    DecodePlan,
    junk_error,
    metadata_cost,
    ns,
    pixel_costs,
    refuse_exif,
    refuse_metadata,
    refuse_steps,
)

_JPEG_MARKER = re.compile(rb"\xff([^\x00\xff])")
# Markers Pillow reads a length for (all others it steps over, or refuses as "no marker found").
_JPEG_WITH_LENGTH = frozenset(
    [*range(0xC0, 0xC8), *range(0xC9, 0xD0), *range(0xDA, 0xE0), *range(0xE0, 0xF0), 0xFE]
)
_JPEG_STANDALONE = frozenset([0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)])
_JPEG_FRAMES = frozenset(
    [*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xDE]
)
_PROGRESSIVE = frozenset([0xC2, 0xC6, 0xCA, 0xCE])
_LOSSLESS = frozenset([0xC3, 0xC7, 0xCB, 0xCF])
_HIERARCHICAL = frozenset([0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF, 0xDE])


@dataclass(frozen=True)
class JpegFrame:
    """A JPEG frame header: the coding process and the 8x8 blocks of each component, by component id."""

    marker: int
    width: int
    height: int
    blocks: dict[int, int]
    """Blocks of each component as libjpeg allocates them (rounded up to its sampling factors)."""

    @classmethod
    def parse(cls, marker: int, payload: bytes, name: str) -> JpegFrame:
        precision, height, width, count = struct.unpack_from(">BHHB", payload)
        if precision != 8:
            raise InvalidInputError(
                f"{name}: this is a {precision}-bit JPEG; only 8-bit JPEGs are decoded, re-encode it as an "
                "8-bit baseline JPEG"
            )
        if marker in _HIERARCHICAL:
            raise InvalidInputError(
                f"{name}: this is a hierarchical (differential) JPEG, which the decoder does not support; "
                "re-encode it as a baseline JPEG"
            )
        listed = min(count, (len(payload) - 6) // 3)  # libjpeg refuses a frame shorter than declared
        factors = [
            (payload[6 + 3 * i], payload[7 + 3 * i] >> 4, payload[7 + 3 * i] & 15) for i in range(listed)
        ]
        max_h = max((h for _, h, _ in factors), default=1) or 1
        max_v = max((v for _, _, v in factors), default=1) or 1
        blocks = {}
        for ident, h, v in factors:
            across = math.ceil(math.ceil(width * h / max_h) / 8)
            down = math.ceil(math.ceil(height * v / max_v) / 8)
            blocks[ident] = _round_up(across, max(h, 1)) * _round_up(down, max(v, 1))
        return cls(marker, width, height, blocks)

    @property
    def total_blocks(self) -> int:
        return sum(self.blocks.values())

    def scan_blocks(self, header: bytes) -> int:
        """Blocks one scan walks, from its header; a header libjpeg would refuse counts them all."""
        count = header[0] if header else 0
        if not 1 <= count <= 4 or len(header) < 1 + 2 * count:
            return self.total_blocks
        largest = max(self.blocks.values(), default=0)
        return sum(self.blocks.get(header[1 + 2 * i], largest) for i in range(count))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class JpegPlan(DecodePlan):
    frame: JpegFrame | None
    multi_scan: bool
    """libjpeg keeps the whole coefficient array (progressive, or a first scan without every component)."""
    scans: int
    block_passes: int
    coded_bytes: int
    steps: int
    junk: int
    metadata: int
    ifd_bytes: int
    copied: int

    kind = "JPEG"

    @property
    def reducible(self) -> bool:
        return self.frame is not None and self.frame.marker not in _LOSSLESS

    def costs(self, size: tuple[int, int], mode: str) -> list[Cost]:
        header = Cost(
            ns(self.steps, NS_JPEG_SEGMENT) + ns(self.junk, NS_JUNK_BYTE),
            0,
            f"{self.steps:,} header segments",
            "re-save it with a standard encoder",
        )
        costs = [
            header,
            metadata_cost(self.metadata, self.ifd_bytes, self.copied, "JPEG"),
            pixel_costs(size, mode),
        ]
        frame = self.frame
        if frame is None:
            return costs
        if frame.marker in _LOSSLESS:
            samples = size[0] * size[1] * len(frame.blocks)
            lossless = Cost(
                ns(samples, NS_LOSSLESS_SAMPLE),
                2 * samples if self.multi_scan else 0,
                f"{samples:,} lossless samples",
                "re-encode it as a baseline JPEG",
            )
            return [*costs, lossless]
        kind = "progressive" if frame.marker in _PROGRESSIVE else "multi-scan"
        blocks = f"{frame.width}x{frame.height} ({frame.total_blocks:,} blocks of 8x8)"
        coefficients = JPEG_BLOCK_BYTES * frame.total_blocks if self.multi_scan else 0
        return [
            *costs,
            Cost(
                0,
                coefficients,
                f"the DCT coefficients of a {kind} {blocks}",
                "re-encode it as a baseline JPEG",
            ),
            Cost(
                ns(self.block_passes, NS_JPEG_BLOCK_PASS if self.multi_scan else NS_JPEG_BLOCK_SEQUENTIAL),
                0,
                f"{self.scans} scans over a {blocks} ({self.block_passes:,} block passes)",
                "re-encode it as a baseline JPEG, or downscale it",
            ),
            Cost(
                ns(self.coded_bytes, NS_JPEG_CODED_BYTE),
                0,
                f"{self.coded_bytes:,} bytes of compressed data",
                "re-encode it at a lower quality, or downscale it",
            ),
            Cost(
                ns(size[0] * size[1], NS_JPEG_OUTPUT_PIXEL),
                0,
                f"{size[0]}x{size[1]} output pixels",
                "downscale it",
            ),
        ]


def inspect_jpeg(data: bytes, name: str) -> JpegPlan:
    """Walk the segments as Pillow does, up to the first scan header; then count the scans."""
    pos, steps, junk, metadata, exif, copied, mpf = 2, 0, 0, 0, 0, 0, 0
    frame: JpegFrame | None = None
    first_scan: bytes | None = None
    while first_scan is None:
        window = pos + MAX_JUNK_BYTES - junk + 2  # a bounded search: past it, Pillow would step too far
        marker = _JPEG_MARKER.search(data, pos, window)
        if marker is None:
            if window < len(data):
                raise junk_error(name, "JPEG", "between its header segments")
            break  # no scan at all: Pillow refuses the file
        junk += marker.start() - pos
        steps += 1
        refuse_steps(steps, "header segments", name, "JPEG", "re-save it with a standard encoder")
        code, pos = marker[1][0], marker.end()
        if code in _JPEG_STANDALONE:
            continue
        if code not in _JPEG_WITH_LENGTH:
            break  # Pillow refuses: "no marker found"
        length = int.from_bytes(data[pos : pos + 2], "big")
        payload, pos = data[pos + 2 : pos + length], pos + max(length, 2)
        if code == 0xDA:
            first_scan = payload
            break
        metadata += len(payload)
        if code == 0xE1 and payload.startswith(b"Exif\x00\x00"):
            exif += len(payload)
            copied += exif  # Pillow appends each Exif segment to a new copy of the ones before
        elif code == 0xE2 and payload.startswith(b"MPF\x00"):
            mpf = len(payload)
        elif code in _JPEG_FRAMES:
            if frame is not None:
                raise InvalidInputError(
                    f"{name}: this JPEG has two frame headers; re-save it with a standard encoder"
                )
            frame = JpegFrame.parse(code, payload, name)
        refuse_metadata(metadata, name, "JPEG")
        refuse_exif(exif, name, "JPEG")
    scans, passes, multi = 0, 0, False
    if frame is not None and first_scan is not None:
        scans, passes, multi = _count_scans(data, pos, frame, first_scan, name)
    return JpegPlan(frame, multi, scans, passes, len(data) - pos, steps, junk, metadata, exif + mpf, copied)


def _count_scans(data: bytes, start: int, frame: JpegFrame, first: bytes, name: str) -> tuple[int, int, bool]:
    """(scans, block passes, multi-scan) from the first scan header on, counted conservatively."""
    if data.find(b"\xff" * MAX_JPEG_FILL_RUN, start) >= 0:
        raise InvalidInputError(
            f"{name}: this JPEG has a run of more than {MAX_JPEG_FILL_RUN:,} 0xFF fill bytes after its first "
            "scan; re-save it with a standard encoder"
        )
    multi = frame.marker in _PROGRESSIVE or (first[0] if first else 0) < len(frame.blocks)
    if not multi:
        # libjpeg decodes the one scan as it reads it, and stops with an error at any second one.
        return 1, frame.total_blocks, False
    scans = 1 + data.count(b"\xff\xda", start)
    if scans > MAX_JPEG_SCANS:
        raise InvalidInputError(
            f"{name}: this JPEG has {scans:,} scans (more than {MAX_JPEG_SCANS}), and every scan walks the "
            "whole image; re-encode it as a baseline JPEG"
        )
    passes = frame.scan_blocks(first) + frame.total_blocks  # the first scan, and the output pass
    at = data.find(b"\xff\xda", start)
    while at >= 0:
        header = data[at + 4 : at + 4 + 1 + 2 * 4]
        passes += frame.scan_blocks(header)
        at = data.find(b"\xff\xda", at + 2)
    return scans, passes, True
