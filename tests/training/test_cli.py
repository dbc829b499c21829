"""`python -m training fit/export` end to end on a tiny folder of real photos, and its failures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from modelcontract import INPUT_NAME, MODEL_FILENAME, ModelMetadata
from tests.training.images import TINY_LABELS, write_image_folder
from training.cli import build_parser
from training.config import RunConfig
from training.pipeline import CHECKPOINT_FILENAME, fit
from training.pretrained import packaged_efficientnet_lite0_path, read_state_dict

ISSUE_FLAGS = ("--backbone", "--weights", "--no-pretrained", "--image-size", "--frozen-epochs",
               "--unfrozen-epochs", "--unfreeze-blocks", "--head-lr", "--base-lr", "--batch-size",
               "--val-split", "--seed", "--device", "--patience")  # fmt: skip
TINY_FIT = ["--backbone", "lenet5", "--no-pretrained", "--image-size", "32", "--unfrozen-epochs", "2",
            "--batch-size", "8", "--workers", "0"]  # fmt: skip


def _training(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args], capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_image_folder(tmp_path_factory.mktemp("photos"), per_class=8)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


@pytest.fixture(scope="module")
def fitted(
    photo_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("models") / "photos"
    done = _training("fit", "--data", str(photo_folder), "--out", str(out), *TINY_FIT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_fit_publishes_a_complete_version(fitted: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, done = fitted
    assert sorted(p.name for p in out.iterdir()) == ["1"]  # no staging directory left behind
    version = out / "1"
    assert version.stat().st_mode & 0o755 == 0o755  # readable by a service running as another user
    files = sorted(p.name for p in version.iterdir())
    expected = [CHECKPOINT_FILENAME, "config.json", "metrics.json", MODEL_FILENAME, "training.png"]
    assert files == sorted(expected)
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1 and metrics["skipped_files"][0].endswith("broken.jpg")
    assert [p["name"] for p in metrics["phases"]] == ["unfrozen"]  # --no-pretrained: no frozen phase
    epoch = metrics["phases"][0]["epochs"][0]
    assert set(epoch) >= {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"}
    assert set(metrics["per_class_accuracy"]) == set(TINY_LABELS)
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == 6  # 2 of 8 per class held out (one cat broken)
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["parity_max_abs_diff"] <= 1e-4
    assert metrics["onnx_top1_agreement"] == 1.0 and metrics["onnx_val_accuracy"] == metrics["val_accuracy"]
    config = json.loads((version / "config.json").read_text())
    assert config["frozen_epochs"] == 0 and config["unfreeze_blocks"] == "all" and config["image_size"] == 32
    assert (version / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"unfrozen epoch 1/2: train loss [\d.]+ acc [\d.]+ \| val loss", done.stderr)


def test_fitted_model_answers_batch_1_and_17(fitted: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    session = ort.InferenceSession(str(fitted[0] / "1" / MODEL_FILENAME), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, "the fitted model")
    assert metadata.labels == tuple(sorted(TINY_LABELS)) and metadata.backbone == "lenet5"
    assert metadata.extra["skipped_images"] == 1 and metadata.val_accuracy is not None
    for batch in (1, 17):
        logits = session.run(None, {INPUT_NAME: np.zeros((batch, 3, 32, 32), np.float32)})[0]
        assert logits.shape == (batch, 3)


def test_export_republishes_the_checkpoint_as_the_next_version(
    fitted: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out = fitted[0]
    original = (out / "1" / MODEL_FILENAME).read_bytes()
    done = _training("export", "--checkpoint", str(out / "1" / CHECKPOINT_FILENAME), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "1" / MODEL_FILENAME).read_bytes() == original  # never overwritten
    first = ort.InferenceSession(str(out / "1" / MODEL_FILENAME), providers=["CPUExecutionProvider"])
    second = ort.InferenceSession(str(out / "2" / MODEL_FILENAME), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(
        second.run(None, {INPUT_NAME: images})[0], first.run(None, {INPUT_NAME: images})[0]
    )


def test_bad_data_fails_before_training_with_a_message(tmp_path: Path) -> None:
    done = _training("fit", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m"), *TINY_FIT)
    assert done.returncode == 2
    assert "does not exist (expected DIR/<class>/*.jpg)" in done.stderr
    assert "epoch" not in done.stderr and not (tmp_path / "m").exists()


def test_timm_model_without_local_weights_fails_before_training(photo_folder: Path, tmp_path: Path) -> None:
    done = _training(
        "fit", "--data", str(photo_folder), "--out", str(tmp_path / "m"), "--backbone", "resnet18"
    )
    assert done.returncode == 2
    assert "pass --weights PATH" in done.stderr and "--no-pretrained" in done.stderr
    assert "epoch" not in done.stderr and not (tmp_path / "m").exists()


def test_every_fit_flag_has_help_with_its_default() -> None:
    fit_parser = build_parser()._subparsers._group_actions[0].choices["fit"]  # type: ignore[union-attr]
    actions = {option: action for action in fit_parser._actions for option in action.option_strings}
    for flag in ISSUE_FLAGS:
        assert flag in actions, flag
    for option, action in actions.items():
        if option in ("-h", "--help", "--data", "--out", "--flip"):
            continue
        assert "default" in (action.help or ""), f"{option} help does not state its default"


def _tiny_config(data: Path, out: Path, **overrides: object) -> RunConfig:
    values: dict = {"data": str(data), "out": str(out), "image_size": 32, "batch_size": 8, **overrides}
    return RunConfig(**values)


def test_seeded_cpu_runs_are_reproducible(photo_folder: Path, tmp_path: Path) -> None:
    config = _tiny_config(
        photo_folder, tmp_path / "a", backbone="lenet5", pretrained=False, unfrozen_epochs=2
    )
    first = json.loads((fit(config) / "metrics.json").read_text())["phases"]
    again = json.loads((fit(config) / "metrics.json").read_text())["phases"]
    strip = [[{k: v for k, v in e.items() if k != "seconds"} for e in p["epochs"]] for p in first]
    assert strip == [[{k: v for k, v in e.items() if k != "seconds"} for e in p["epochs"]] for p in again]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["1", "2"]


def test_pretrained_fit_exports_a_model_whose_batchnorm_is_the_pretrained_one(
    photo_folder: Path, tmp_path: Path
) -> None:
    config = _tiny_config(
        photo_folder, tmp_path / "effnet", image_size=64, frozen_epochs=1, unfrozen_epochs=1
    )
    version = fit(config)
    metrics = json.loads((version / "metrics.json").read_text())
    assert [p["name"] for p in metrics["phases"]] == ["frozen", "unfrozen"]
    assert metrics["phases"][1]["trainable_groups"] == ["blocks.5.0.conv_pw", "blocks.6.0.conv_pw"]
    exported = torch.load(version / CHECKPOINT_FILENAME, weights_only=True)["state_dict"]
    packaged = list(read_state_dict(packaged_efficientnet_lite0_path()).items())
    base = [(k, v) for k, v in exported.items() if k.startswith("base.")]
    assert len(base) == 294
    for (name, tensor), (_, pretrained) in zip(base, packaged, strict=False):
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(tensor, pretrained), name
        elif name.startswith(("base.conv_stem", "base.blocks.0.", "base.blocks.1.", "base.blocks.4.")):
            assert torch.equal(tensor, pretrained), f"{name} is below the unfrozen groups"
