"""The parity figure: served inputs against torchvision's pipeline on a full decode, real JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.common.corpus import build_corpus
from benchmarks.peers.parity import MAX_MEAN_ABS_DIFF, measure_parity
from tests.tinymodel import export_tiny


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("parity") / "1", ["cat", "coffee", "astronaut"])


def test_served_inputs_stay_within_the_bound_and_keep_top1(tiny_model_path: Path) -> None:
    # 2-MP and 1.5-MP JPEGs are decoded at reduced size by the service, the 0.3-MP one in full.
    photos = build_corpus((0.3, 1.5, 2.0))
    result = measure_parity(tiny_model_path, photos)
    assert result["photos"] == 3 and len(result["per_photo"]) == 3
    differences = [row["mean_abs_diff"] for row in result["per_photo"]]
    assert max(differences) <= MAX_MEAN_ABS_DIFF
    assert max(differences) > 0, "the large JPEGs were not decoded at reduced size"
    assert result["mean_abs_diff_max"] == pytest.approx(max(differences), abs=1e-5)
    assert result["top1_same"] == 3 and result["met"] is True
    assert np.isfinite(result["max_abs_diff"])
