"""Every session allocates from one CPU arena per process, so an extra model costs about its weights, not
another arena grown to its largest batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from convserve.importer import ImportRequest, import_model
from tests.convserve.graphs import classifier, save
from tests.liveserver import REPO_ROOT

MODELS = 4
BATCH = 32
SIZE = 160
# Each model: a 3x3 convolution to 4 channels of SIZE x SIZE, so a batch of BATCH needs the conv and
# ReLU outputs, 2 x 4 x 4 x 160 x 160 x 32 bytes = 26 MB of arena, from weights of under 1 KB.
ARENA_MB = 2 * 4 * 4 * SIZE * SIZE * BATCH / 2**20

# Loads each model as the service does (its session options, warmed up at batch sizes 1 and BATCH) and
# prints the process's RSS after each.
_LOAD_SCRIPT = """
import json, sys, psutil
from pathlib import Path
from service.models.runtime import load_model
rss, served = [], []  # every model stays loaded, as in the service
for path in sys.argv[2:]:
    served.append(load_model(Path(path), ["CPUExecutionProvider"], intra_op_threads=1))
    served[-1].warmup((1, int(sys.argv[1])))
    rss.append(psutil.Process().memory_info().rss / 2**20)
print(json.dumps(rss))
"""


def test_extra_models_cost_a_small_fraction_of_one_arena(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    paths = []
    for index in range(MODELS):
        original = save(classifier(size=SIZE, seed=index), tmp_path / f"original{index}.onnx")
        request = ImportRequest(
            model=original, name=f"wide{index}", labels=labels, repository=tmp_path / "models"
        )
        paths.append(str(import_model(request).path))
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(BATCH), *paths],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    per_extra_model = (rss[-1] - rss[0]) / (MODELS - 1)
    # With an arena per session each extra model adds its own arena, grown by the batch-BATCH warmup
    # (measured: ~72 MB each, ORT rounds up and keeps buffers besides the two outputs); with the shared
    # arena, a session's own bookkeeping (~3 MB measured).
    assert per_extra_model < ARENA_MB / 2, (rss, ARENA_MB)
