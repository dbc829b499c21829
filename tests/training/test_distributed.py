"""`torchrun --nproc_per_node 2 -m training fit` on CPU (gloo): two real processes, a tiny photo folder.

With augmentation and dropout off, two processes at batch 4 take exactly the optimizer steps one
process takes at batch 8: the DistributedSampler hands rank r the images r, r+2, ... of the same
per-epoch permutation, so the two shards of step k are the single process's batch k, and DDP
averages the two mean-loss gradients into that batch's mean-loss gradient. What differs is only the
order of floating-point sums (gloo's all-reduce, 1 thread per process vs 2 threads), so the
validation losses agree to a relative 1e-3 and the accuracies to within one validation image.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modelcontract import INPUT_NAME, MODEL_FILENAME
from tests.training.images import write_image_folder
from training.checkpoint import CHECKPOINT_FILENAME, load_checkpoint
from training.config import RunConfig
from training.distributed import Ranks
from training.pipeline import fit

SETTINGS = {"backbone": "lenet5", "pretrained": False, "image_size": 32, "frozen_epochs": 1,
            "unfrozen_epochs": 2, "unfreeze_blocks": 1, "augment": False, "drop_rate": 0.0}  # fmt: skip
FLAGS = ["--backbone", "lenet5", "--no-pretrained", "--image-size", "32", "--frozen-epochs", "1",
         "--unfrozen-epochs", "2", "--unfreeze-blocks", "1", "--no-augment", "--drop-rate", "0"]  # fmt: skip


def _torchrun_fit(data: Path, out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training", "fit", "--data", str(data), "--out", str(out), "--batch-size", "4",
               *FLAGS]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def _history(version: Path) -> list[list[dict]]:
    phases = json.loads((version / "metrics.json").read_text())["phases"]
    return [[{k: v for k, v in e.items() if k != "seconds"} for e in p["epochs"]] for p in phases]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("photos"), per_class=8)


@pytest.fixture(scope="module")
def two_process_runs(photo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "photos"
    for _ in range(2):  # the same seeded command twice, for reproducibility
        done = _torchrun_fit(photo_folder, out)
        assert done.returncode == 0, done.stderr[-3000:]  # torchrun fails if any rank exits non-zero
    return out


def test_two_gloo_processes_run_both_phases_and_publish_one_verified_version(
    two_process_runs: Path,
) -> None:
    assert sorted(p.name for p in two_process_runs.iterdir()) == [
        "1",
        "2",
    ]  # one version per run, no run dirs
    version = two_process_runs / "1"
    metrics = json.loads((version / "metrics.json").read_text())
    assert [p["name"] for p in metrics["phases"]] == ["frozen", "unfrozen"]
    assert [len(p["epochs"]) for p in metrics["phases"]] == [1, 2]
    assert metrics["world_size"] == 2 and metrics["effective_batch_size"] == 8
    config = json.loads((version / "config.json").read_text())
    assert config["batch_size"] == 4 and config["world_size"] == 2 and config["effective_batch_size"] == 8
    assert metrics["parity_max_abs_diff"] <= 1e-4 and metrics["onnx_top1_agreement"] == 1.0

    model, checkpoint = load_checkpoint(version / CHECKPOINT_FILENAME)
    images = checkpoint["parity_inputs"]
    session = ort.InferenceSession(str(version / MODEL_FILENAME), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = torch.softmax(model(images), dim=1).numpy()
    logits = session.run(None, {INPUT_NAME: images.numpy()})[0]
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), dim=1).numpy(), expected, atol=1e-4)


def test_two_process_run_is_reproducible_with_a_fixed_seed(two_process_runs: Path) -> None:
    assert _history(two_process_runs / "1") == _history(two_process_runs / "2")
    first = torch.load(two_process_runs / "1" / CHECKPOINT_FILENAME, weights_only=True)["state_dict"]
    second = torch.load(two_process_runs / "2" / CHECKPOINT_FILENAME, weights_only=True)["state_dict"]
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_one_process_at_the_same_effective_batch_takes_the_same_steps(
    two_process_runs: Path, photo_folder: Path, tmp_path: Path
) -> None:
    single = fit(RunConfig(data=str(photo_folder), out=str(tmp_path / "one"), batch_size=8, **SETTINGS))  # type: ignore[arg-type]
    assert json.loads((single / "metrics.json").read_text())["world_size"] == 1
    for one_phase, two_phase in zip(_history(single), _history(two_process_runs / "1"), strict=True):
        for one, two in zip(one_phase, two_phase, strict=True):
            assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-3)
            assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-3)
            assert abs(one["val_accuracy"] - two["val_accuracy"]) <= 1 / 6 + 1e-9  # one of 6 images


def _collectives(rank: int, world_size: int, directory: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        ranks = Ranks(rank, world_size, torch.device("cpu"))
        norm = torch.nn.BatchNorm2d(2)
        norm.running_mean.fill_(float(rank))  # what each shard's BatchNorm learned differs
        norm.running_var.fill_(1.0 + 2 * rank)
        ranks.average_buffers(norm)
        result = {
            "mean": norm.running_mean.tolist(),
            "var": norm.running_var.tolist(),
            "sum": ranks.sum([1.0, rank]),
            "shared": ranks.share(f"from rank {rank}"),
        }
        (Path(directory) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ranks_average_trained_batchnorm_and_sum_metrics_over_gloo(tmp_path: Path) -> None:
    mp.spawn(_collectives, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["mean"] == [0.5, 0.5] and result["var"] == [2.0, 2.0]
        assert result["sum"] == [2.0, 1.0] and result["shared"] == "from rank 0"
