"""The WebP walker: RIFF chunks, animation frames and metadata.

What each unit costs, and why, is in `budget`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.inference.decodecost.budget import (
    NS_WEBP_FRAME,
    NS_WEBP_PIXEL,
    WEBP_CANVAS_BYTES,
    WEBP_FRAME_BYTES,
    Cost,
    DecodePlan,
    metadata_cost,
    ns,
    pixel_costs,
    refuse_exif,
    refuse_metadata,
    refuse_steps,
)


@dataclass(frozen=True)
class WebpPlan(DecodePlan):
    frames: int
    metadata: int
    exif: int

    kind = "WebP"

    def costs(self, size: tuple[int, int], mode: str) -> list[Cost]:
        pixels = size[0] * size[1]
        return [
            Cost(
                ns(self.frames, NS_WEBP_FRAME),
                WEBP_FRAME_BYTES * self.frames,
                f"{self.frames:,} animation frames",
                "send one frame as a still image",
            ),
            metadata_cost(self.metadata, self.exif, 0, "WebP"),
            Cost(
                ns(pixels, NS_WEBP_PIXEL),
                WEBP_CANVAS_BYTES * pixels,
                f"a {size[0]}x{size[1]} canvas",
                "downscale it",
            ),
            pixel_costs(size, mode),
        ]


def inspect_webp(data: bytes, name: str) -> WebpPlan:
    pos, chunks, frames, metadata, exif = 12, 0, 0, 0, 0
    while pos + 8 <= len(data):
        kind, length = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + length + (length & 1)
        chunks += 1
        refuse_steps(chunks, "chunks (animation frames)", name, "WebP", "send one frame as a still image")
        if kind == b"ANMF":
            frames += 1
        elif kind not in (b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM"):
            metadata += length
            exif += length if kind == b"EXIF" else 0
        refuse_metadata(metadata, name, "WebP")
        refuse_exif(exif, name, "WebP")
    return WebpPlan(frames, metadata, exif)
