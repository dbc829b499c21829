"""`heatmaps.peak`: where a class activation map is highest, placed between its cells, in the pixels
of the image whose crop box the map covers.

Each expected point follows from how its map is built (the vertex of a sampled paraboloid, the
midpoint of two equally hot cells, the centre of an edge cell), mapped into the box by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.protocols import heatmaps

BOX = (40.0, 20.0, 400.0, 300.0)
"""A crop box that neither starts at the origin nor is square: 360 x 280 pixels."""


def in_box(row: float, col: float, shape: tuple[int, int]) -> tuple[float, float]:
    """Cell coordinates (whole numbers at cells' centres) to the box's pixels, written out by hand."""
    rows, cols = shape
    return BOX[0] + (col + 0.5) * 360 / cols, BOX[1] + (row + 0.5) * 280 / rows


@pytest.mark.parametrize("vertex", [(2.3, 5.6), (3.0, 1.45), (4.8, 6.2), (1.0, 4.0)])
def test_peak_is_the_vertex_of_a_sampled_paraboloid(vertex: tuple[float, float]) -> None:
    shape = (7, 9)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    cam = (12.0 - (rows - vertex[0]) ** 2 - 0.5 * (cols - vertex[1]) ** 2).astype(np.float32)
    assert heatmaps.peak(cam, BOX) == pytest.approx(in_box(*vertex, shape), abs=1e-3)


def test_two_equally_hot_cells_peak_midway_between_them() -> None:
    cam = np.zeros((7, 7), np.float32)
    cam[3, 2] = cam[3, 3] = 5.0
    cam[2:5, 1:5] += 1.0  # a blob around them, so the fit has neighbours that are cooler
    assert heatmaps.peak(cam, BOX) == pytest.approx(in_box(3.0, 2.5, cam.shape))


def test_a_peak_on_the_maps_edge_stays_at_its_cells_centre() -> None:
    # Hottest in the top-left corner and rising towards it: there is no cell beyond to fit a vertex to,
    # so the point is the corner cell's centre, not the box's edge; the same for the opposite corner.
    rows, cols = np.mgrid[0:7, 0:7]
    cam = -(rows + cols).astype(np.float32)
    assert heatmaps.peak(cam, BOX) == pytest.approx(in_box(0.0, 0.0, cam.shape))
    assert heatmaps.peak(cam[::-1, ::-1], BOX) == pytest.approx(in_box(6.0, 6.0, cam.shape))


def test_image_point_puts_cell_centres_in_the_middle_of_their_share_of_the_box() -> None:
    assert heatmaps.image_point(0.0, 0.0, (7, 9), BOX) == pytest.approx((40 + 20, 20 + 20))
    assert heatmaps.image_point(6.0, 8.0, (7, 9), BOX) == pytest.approx((400 - 20, 300 - 20))
    assert heatmaps.image_point(-0.5, -0.5, (7, 9), BOX) == pytest.approx(BOX[:2])
