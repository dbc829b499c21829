"""Run configuration: dataset- and backbone-dependent defaults, validation, the eval transform."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from modelcontract import INTERPOLATIONS, EvalSpec
from training.config import RunConfig
from training.transforms import NO_AUGMENTATION, eval_transform, train_transform


def test_demo_digits_defaults_are_small_uncropped_and_never_flipped() -> None:
    config = RunConfig(data="demo:digits", out="models/digits").resolve()
    assert (config.image_size, config.crop_pct, config.horizontal_flip) == (96, 1.0, False)
    assert (config.frozen_epochs, config.unfreeze_blocks, config.unfreeze_count) == (5, 2, 2)
    assert config.augmentation().horizontal_flip is False


def test_folder_defaults_follow_the_backbone() -> None:
    config = RunConfig(data="photos", out="models/photos").resolve()
    assert (config.image_size, config.crop_pct, config.horizontal_flip) == (224, 0.875, True)
    spec = config.eval_spec("bicubic", (0.5,) * 3, (0.5,) * 3)
    assert (spec.input_size, spec.resize_size) == ((224, 224), 256)


def test_random_init_trains_everything_from_the_start() -> None:
    config = RunConfig(data="photos", out="m", backbone="lenet5", pretrained=False).resolve()
    assert (config.frozen_epochs, config.unfreeze_blocks, config.unfreeze_count) == (0, "all", None)
    assert config.image_size == 32


def test_explicit_values_win_over_defaults() -> None:
    config = RunConfig(
        data="demo:digits", out="m", image_size=64, frozen_epochs=1, unfreeze_blocks="3", horizontal_flip=True
    ).resolve()
    assert (config.image_size, config.frozen_epochs, config.unfreeze_count, config.horizontal_flip) == (
        64, 1, 3, True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"val_split": 1.5}, "--val-split must be between 0 and 1"),
        ({"frozen_epochs": 0, "unfrozen_epochs": 0}, "not both 0"),
        ({"unfreeze_blocks": "some"}, "a number or 'all'"),
        ({"image_size": 16}, "at least 32 px"),
        ({"device": "tpu"}, "auto, cpu or cuda"),
        ({"base_lr": 0.0}, "learning rates must be positive"),
    ],
)
def test_invalid_settings_are_refused_with_the_flag_named(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig(data="demo:digits", out="m", **overrides).resolve()


def test_config_round_trips_through_json(tmp_path: Path) -> None:
    config = RunConfig(data="demo:digits", out="m", weights="w.pth").resolve()
    config.write(tmp_path / "config.json")
    assert RunConfig.from_json(json.loads((tmp_path / "config.json").read_text())) == config


def test_training_without_augmentation_is_the_eval_transform(photos: list[Image.Image]) -> None:
    spec = EvalSpec((48, 48), 55, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for image in photos[:3]:
        assert torch.equal(train_transform(spec, NO_AUGMENTATION)(image), eval_transform(spec)(image))


def test_augmentation_changes_images_but_keeps_their_shape(photos: list[Image.Image]) -> None:
    spec = EvalSpec((48, 48), 55, "bilinear", (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(0)
    augmented = train_transform(spec, RunConfig(data="x", out="m").resolve().augmentation())(photos[0])
    assert augmented.shape == (3, 48, 48)
    assert not torch.equal(augmented, eval_transform(spec)(photos[0]))


def test_every_contract_interpolation_is_a_torchvision_mode() -> None:
    # training.transforms builds its torchvision steps with InterpolationMode(name), without a map.
    assert [InterpolationMode(name).value for name in INTERPOLATIONS] == list(INTERPOLATIONS)
