"""The BMP reader: the compression from the header, and the run-length codes Pillow decodes in Python.

What each unit costs, and why, is in `budget`'s docstring.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from service.inference.decodecost.budget import (
    NS_BMP_PIXEL,
    NS_BMP_RLE4_PIXEL,
    NS_BMP_RLE_CODE,
    Cost,
    DecodePlan,
    ns,
    pixel_costs,
)


@dataclass(frozen=True)
class BmpPlan(DecodePlan):
    compression: int
    coded_bytes: int

    kind = "BMP"

    def costs(self, size: tuple[int, int], mode: str) -> list[Cost]:
        pixels = size[0] * size[1]
        costs = [
            Cost(ns(pixels, NS_BMP_PIXEL), 0, f"{size[0]}x{size[1]} pixels", "downscale it"),
            pixel_costs(size, mode),
        ]
        if self.compression in (1, 2):  # RLE8, RLE4: decoded in Python, one 2-byte code at a time
            rle4 = self.compression == 2
            costs.append(
                Cost(
                    ns(self.coded_bytes / 2, NS_BMP_RLE_CODE)
                    + (ns(pixels, NS_BMP_RLE4_PIXEL) if rle4 else 0),
                    2 * pixels,
                    f"{self.coded_bytes:,} bytes of run-length codes",
                    "send it as PNG instead of run-length-encoded BMP",
                )
            )
        return costs


def inspect_bmp(data: bytes) -> BmpPlan:
    (offset,) = struct.unpack_from("<I", data, 10)
    (header,) = struct.unpack_from("<I", data, 14)
    compression = struct.unpack_from("<I", data, 30)[0] if header >= 40 else 0
    return BmpPlan(compression, max(0, len(data) - offset))
