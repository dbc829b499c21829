"""Class activation maps made presentable: normalized grids for JSON, and a heat overlay as a PNG.

A raw map covers the model's center crop at the feature map's resolution (7x7 for EfficientNet-Lite0
at 224 px). For JSON it is upsampled to at most `MAX_GRID_SIDE` cells a side, keeping the crop's
aspect: the full 224x224 would be ~400 KB of numbers per map, and a client overlaying it on a photo
resamples it anyway. For the PNG the photo is first scaled down to at most `OVERLAY_PIXELS_PER_CROP_PIXEL`
times the model crop's pixels (548x365 for a 3:2 photo and a 224 px crop), then the map is upsampled
to the crop box's size there and blended over it.

Where a map points (`peak`): the hottest cell of a 7x7 map only says which seventh of the crop holds
the evidence, and when the object straddles two cells the hotter of two near-equal neighbours wins by
a hair. `peak` places the maximum between cells, at the vertex of the parabola through the hottest
cell and its two neighbours on each axis (the usual sub-pixel refinement of a sampled peak), and
maps it into the image's pixels through the crop box. The bilinear grid cannot show that point: its
maximum always sits on a cell's centre.

Cost: a grid is at most 56x56 floats. The PNG's bound is what keeps a small upload from buying a
large answer and seconds of CPU: at the decode bound (4 MP) a noisy 261 KB JPEG became an 11.9 MB
PNG for 1.3 CPU-s. At four pixels per crop pixel its raw RGB is exactly the request's float32 tensor
bytes (3 x 4 bytes per crop pixel), so even an incompressible PNG stays within the answer rule every
route follows (`service.protocols.v2codec.check_answer_bound`), for ~0.05 CPU-s. Both run on the
decode threads.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAX_GRID_SIDE = 56
"""Largest number of heatmap cells along either side in a JSON answer."""
GRID_DECIMALS = 4
"""Decimals kept per heatmap value in JSON (1e-4 is far below what a colour map shows)."""
OVERLAY_PIXELS_PER_CROP_PIXEL = 4
"""Most pixels of a PNG overlay per pixel of the model's crop (see the module docstring)."""
OVERLAY_OPACITY = 0.5
"""How much of the colour map shows over the photo inside the crop box (0: none, 1: only the map)."""
# A "jet"-like ramp: dark blue (cold, no evidence) through cyan, yellow, to dark red (hot).
_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_COLOURS = np.array(
    [[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], dtype=np.float64
)


def normalized(cam: np.ndarray) -> np.ndarray:
    """The map scaled to [0, 1] (its minimum at 0, its maximum at 1); a flat map is all zeros."""
    cam = np.asarray(cam, dtype=np.float32)
    low, high = float(cam.min()), float(cam.max())
    if not high > low:
        return np.zeros_like(cam)
    return (cam - low) / (high - low)


def grid_size(crop: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a JSON heatmap for a crop of (height, width): the crop, at most `MAX_GRID_SIDE`."""
    height, width = crop
    scale = min(1.0, MAX_GRID_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resampled(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map bilinearly resampled to `size` (rows, cols), then normalized to [0, 1].

    Normalized after resampling, so the grid's own hottest cell is 1: upsampled cells fall between
    the feature map's positions, and none of them would otherwise reach the map's maximum.
    """
    rows, cols = size
    raw = np.asarray(cam, dtype=np.float32)
    image = Image.fromarray(raw).resize((cols, rows), Image.Resampling.BILINEAR)
    return normalized(np.asarray(image, dtype=np.float32))


def peak(cam: np.ndarray, box: tuple[float, float, float, float]) -> tuple[float, float]:
    """(x, y) in the image's pixels where the map `cam` [h, w], which covers `box` (x0, y0, x1, y1), is
    highest: the hottest cell refined between cells by a parabola on each axis (see the module doc).

    A cell on the map's edge is not refined outward (there is no neighbour to fit), and a neighbour
    as hot as the hottest cell moves the point to the midpoint between the two.
    """
    cam = np.asarray(cam, dtype=np.float64)
    rows, cols = cam.shape
    row, col = (int(i) for i in np.unravel_index(int(np.argmax(cam)), cam.shape))
    row_offset = _vertex(cam[row - 1, col], cam[row, col], cam[row + 1, col]) if 0 < row < rows - 1 else 0.0
    col_offset = _vertex(cam[row, col - 1], cam[row, col], cam[row, col + 1]) if 0 < col < cols - 1 else 0.0
    return image_point(row + row_offset, col + col_offset, (rows, cols), box)


def image_point(
    row: float, col: float, shape: tuple[int, int], box: tuple[float, float, float, float]
) -> tuple[float, float]:
    """(x, y) in the image's pixels of the point at (`row`, `col`) of a map of `shape` cells covering
    `box`, where whole numbers are cells' centres: cell (0, 0) covers the box's first 1/h x 1/w."""
    rows, cols = shape
    x0, y0, x1, y1 = box
    return x0 + (col + 0.5) * (x1 - x0) / cols, y0 + (row + 0.5) * (y1 - y0) / rows


def _vertex(before: float, at: float, after: float) -> float:
    """Offset, in cells within [-0.5, 0.5], of the vertex of the parabola through three samples whose
    middle one is the largest; 0 when the three are equal (no peak to place)."""
    curvature = before - 2.0 * at + after
    if curvature >= 0.0:
        return 0.0
    return float(np.clip(0.5 * (before - after) / curvature, -0.5, 0.5))


def heatmap_grid(cam: np.ndarray, crop: tuple[int, int]) -> list[list[float]]:
    """The JSON heatmap of one map: rows x cols of values in [0, 1], at `grid_size(crop)`."""
    grid = np.round(resampled(cam, grid_size(crop)), GRID_DECIMALS)
    return [[float(value) for value in row] for row in grid]


def coloured(values: np.ndarray) -> np.ndarray:
    """An RGB uint8 image [h, w, 3] of values in [0, 1] through the heat colour ramp."""
    flat = values.ravel()
    channels = [np.interp(flat, _STOPS, _COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).reshape(*values.shape, 3).round().astype(np.uint8)


def fitted(photo: Image.Image, max_pixels: int) -> tuple[Image.Image, float]:
    """`photo` as the overlay draws on it (RGB, scaled down to at most `max_pixels`), and the scale."""
    width, height = photo.size
    scale = min(1.0, (max_pixels / (width * height)) ** 0.5)
    if scale < 1.0:
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        return photo.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0), scale
    return photo.convert("RGB"), 1.0


def overlay_png(
    photo: Image.Image, cam: np.ndarray, box: tuple[float, float, float, float], max_pixels: int
) -> bytes:
    """The photo, scaled down to at most `max_pixels` (`fitted`), with the map blended over its crop
    box, as PNG bytes.

    `box` is (x0, y0, x1, y1) in the photo's pixels; the part of it outside the photo (a crop that
    needed padding) is dropped, and the photo outside the box is left as it is.
    """
    photo, scale = fitted(photo, max_pixels)
    x0, y0, x1, y1 = (value * scale for value in box)
    width, height = photo.size
    box_w, box_h = max(1, round(x1 - x0)), max(1, round(y1 - y0))
    heat = coloured(resampled(cam, (box_h, box_w))).astype(np.float32)
    pixels = np.asarray(photo, dtype=np.float32).copy()
    left, top = round(x0), round(y0)
    # The overlap of the box with the photo, in photo and in heat-map coordinates.
    px0, py0 = max(0, left), max(0, top)
    px1, py1 = min(width, left + box_w), min(height, top + box_h)
    if px1 > px0 and py1 > py0:
        region = heat[py0 - top : py1 - top, px0 - left : px1 - left]
        pixels[py0:py1, px0:px1] = (1 - OVERLAY_OPACITY) * pixels[py0:py1, px0:px1] + OVERLAY_OPACITY * region
    out = io.BytesIO()
    Image.fromarray(pixels.round().astype(np.uint8)).save(out, format="PNG", compress_level=3)
    return out.getvalue()
