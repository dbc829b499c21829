"""Every seed architecture goes through the whole pipeline: build -> freeze -> unfreeze -> export.

Random initialization at 64 px keeps this fast; full-size VGG16 (the heaviest) is the slow test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from modelcontract import INPUT_NAME, MODEL_FILENAME, EvalSpec
from tests.training.images import TINY_LABELS, preprocess
from training.backbones import create_model
from training.classifier import Classifier
from training.config import RunConfig
from training.export import export_onnx, next_version_dir
from training.freezing import freeze_base, group_index, parameter_groups, top_groups, unfreeze_top

SEED_ARCHITECTURES = ("lenet5", "alexnet", "zfnet", "vgg16", "googlenet", "resnet50", "efficientnet_lite0")
SMALL = EvalSpec((64, 64), 72, "bilinear", (0.5,) * 3, (0.5,) * 3)
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _step(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> None:
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-2, 1e-2, 0.0))
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("name", SEED_ARCHITECTURES)
def test_seed_architecture_freezes_unfreezes_and_exports_with_parity(
    name: str, photos: list[Image.Image], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=len(TINY_LABELS), freeze_batchnorm=True)
    assert len(model.block_groups) >= 3
    images = preprocess(photos, SMALL)
    labels = torch.arange(len(images)) % len(TINY_LABELS)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    freeze_base(model)
    _step(model, images, labels)
    assert {k for k in _changed(start, model)} <= {"head.linear.weight", "head.linear.bias"}
    assert _changed(start, model), "the head must train in phase 1"

    unfrozen = set(top_groups(model, 2))
    unfreeze_top(model, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, images, labels)
    base_changed = {k.removeprefix("base.") for k in _changed(before, model) if k.startswith("base.")}
    assert base_changed and all(group_index(model, k) in unfrozen for k in base_changed)
    assert not any(k.endswith(BN_BUFFERS) for k in _changed(start, model))

    version_dir = next_version_dir(tmp_path / name)
    metadata = export_onnx(
        model, version_dir, labels=TINY_LABELS, eval_spec=SMALL, backbone=name, parity_inputs=images[:4]
    )
    assert metadata.parity_max_abs_diff is not None and metadata.parity_max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(version_dir / MODEL_FILENAME), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images):
        logits = session.run(None, {INPUT_NAME: batch.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(batch).numpy(), atol=1e-4, rtol=1e-3)


def test_lenet5_takes_any_square_input_of_at_least_32_px() -> None:
    model = create_model("lenet5", num_classes=5).eval()
    for size in (32, 33, 48, 100):
        assert model(torch.zeros(2, 3, size, size)).shape == (2, 5)
    assert not model.freeze_batchnorm


def test_zfnet_reproduces_the_papers_layer_table_at_224_px() -> None:
    base = create_model("zfnet", num_classes=5).base.eval()
    features, shapes = torch.zeros(1, 3, 224, 224), []
    for group in base.block_groups:
        features = getattr(base, group[0])(features)
        shapes.append(tuple(features.shape[1:]))
    # Zeiler & Fergus, Fig. 3: 55x55x96, 13x13x256, 13x13x384, 13x13x384, 6x6x256.
    assert shapes == [(96, 55, 55), (256, 13, 13), (384, 13, 13), (384, 13, 13), (256, 6, 6)]
    first = base.layer1[0]
    assert first.kernel_size == (7, 7) and first.stride == (2, 2)


def test_zfnet_is_trained_from_scratch_at_a_size_it_can_pool() -> None:
    with pytest.raises(ValueError, match="zfnet has no pretrained weights: train it with --no-pretrained"):
        create_model("zfnet", num_classes=3, pretrained=True)
    assert not create_model("zfnet", num_classes=3).freeze_batchnorm
    with pytest.raises(ValueError, match="too small for zfnet: it needs at least 63 px"):
        RunConfig(data="photos", out="m", backbone="zfnet", pretrained=False, image_size=48).resolve()
    assert RunConfig(data="photos", out="m", backbone="zfnet", pretrained=False).resolve().image_size == 224


@pytest.mark.slow
def test_full_size_vgg16_exports_with_parity(photos: list[Image.Image], tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = EvalSpec.from_crop_pct(224, 0.875, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    model = create_model("vgg16", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) > 15_000_000
    metadata = export_onnx(
        model,
        next_version_dir(tmp_path / "vgg16"),
        labels=[f"class {i}" for i in range(1000)],
        eval_spec=spec,
        backbone="vgg16",
        parity_inputs=preprocess(photos[:3], spec),
    )
    assert metadata.input_shape == (3, 224, 224)
    assert metadata.parity_max_abs_diff is not None and metadata.parity_max_abs_diff <= 1e-4
