"""The heart of two-phase fine-tuning: what moves in each phase, and BatchNorm that never does.

Run on the real pretrained EfficientNet-Lite0 and real photos, with the same Trainer, freezing
functions and optimizer groups that `fit` uses.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from modelcontract import EvalSpec
from tests.training.images import TINY_LABELS, write_image_folder
from training.backbones import create_model
from training.classifier import Classifier
from training.config import RunConfig
from training.data import ImageDataset, load_dataset
from training.distributed import Ranks
from training.finetune import warmup_cosine
from training.freezing import freeze_base, group_index, parameter_groups, top_groups, unfreeze_top
from training.trainer import Trainer
from training.transforms import Augmentation, train_transform

SPEC = EvalSpec((64, 64), 64, "bicubic", (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def loader(tmp_path_factory: pytest.TempPathFactory) -> DataLoader:
    root = write_image_folder(tmp_path_factory.mktemp("photos"), per_class=6)
    dataset = load_dataset(str(root), val_split=0.2)
    images = ImageDataset(dataset.train, train_transform(SPEC, Augmentation()), [])
    return DataLoader(images, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bn_buffers(model: Classifier) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in model.state_dict().items()
        if k.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }


def _train(model: Classifier, loader: DataLoader, head_lr: float, base_lr: float, epochs: int = 2) -> None:
    config = RunConfig(data="demo:digits", out="unused", label_smoothing=0.1)
    trainer = Trainer(model, config, Ranks())
    optimizer = torch.optim.AdamW(parameter_groups(model, head_lr, base_lr, 1e-2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs * len(loader), 1))
    for epoch in range(epochs):
        trainer.train_epoch(loader, optimizer, scheduler, f"test {epoch}")


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


@pytest.fixture(scope="module")
def pretrained_start() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _snapshot(create_model("efficientnet_lite0", num_classes=len(TINY_LABELS), pretrained=True))


@pytest.fixture
def model(pretrained_start: dict[str, torch.Tensor]) -> Classifier:
    model = create_model("efficientnet_lite0", num_classes=len(TINY_LABELS))
    model.load_state_dict(pretrained_start)
    model.freeze_batchnorm = True
    return model


def test_phase_one_moves_only_the_head(model: Classifier, loader: DataLoader, pretrained_start) -> None:
    freeze_base(model)
    _train(model, loader, head_lr=3e-3, base_lr=3e-4)
    changed = _changed(pretrained_start, model)
    assert changed == {"head.linear.weight", "head.linear.bias"}
    assert model.training and all(
        not m.training for m in model.base.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )


def test_phase_two_moves_only_the_top_groups_and_never_batchnorm_statistics(
    model: Classifier, loader: DataLoader, pretrained_start
) -> None:
    freeze_base(model)
    _train(model, loader, head_lr=3e-3, base_lr=3e-4, epochs=1)
    unfrozen = unfreeze_top(model, 2)
    assert unfrozen == ["blocks.5.0.conv_pw", "blocks.6.0.conv_pw"]
    after_phase_one = _snapshot(model)
    _train(model, loader, head_lr=1e-3, base_lr=3e-4)

    changed = {k.removeprefix("base.") for k in _changed(after_phase_one, model) if k.startswith("base.")}
    top = set(top_groups(model, 2))
    assert changed, "the unfrozen blocks must train"
    assert all(group_index(model, name) in top for name in changed)
    moved_groups = {group_index(model, name) for name in changed}
    assert moved_groups == top  # both unfrozen groups (incl. conv_head in the top one) trained
    assert "conv_head.weight" in changed
    bn = _bn_buffers(model)
    assert all(torch.equal(pretrained_start[k], v) for k, v in bn.items()), "BatchNorm statistics moved"
    assert len(bn) == 3 * 49  # every BatchNorm layer of EfficientNet-Lite0 was checked


def test_requires_grad_alone_would_let_batchnorm_statistics_drift(
    model: Classifier, loader: DataLoader, pretrained_start
) -> None:
    """The trap the freezing avoids: without inference-mode BN, a frozen base still changes."""
    model.freeze_batchnorm = False
    freeze_base(model)
    _train(model, loader, head_lr=3e-3, base_lr=3e-4, epochs=1)
    drifted = _changed(pretrained_start, model) & set(_bn_buffers(model))
    assert len(drifted) > 100


def test_unfreeze_all_trains_every_base_parameter(model: Classifier) -> None:
    freeze_base(model)
    assert unfreeze_top(model, None)[0] == "conv_stem"
    assert all(p.requires_grad for p in model.base.parameters())
    unfreeze_top(model, 0)
    assert not any(p.requires_grad for p in model.base.parameters())


def test_discriminative_learning_rates_and_no_decay_on_biases(model: Classifier) -> None:
    freeze_base(model)
    unfreeze_top(model, 1)
    groups = parameter_groups(model, head_lr=1e-3, base_lr=1e-4, weight_decay=0.05)
    by_part = {(g["part"], g["weight_decay"]): g for g in groups}
    assert by_part["head", 0.05]["lr"] == 1e-3 and by_part["base", 0.05]["lr"] == 1e-4
    assert all(p.dim() == 1 for p in by_part["base", 0.0]["params"])  # type: ignore[attr-defined]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable  # type: ignore[attr-defined]


def test_warmup_then_cosine_schedule() -> None:
    factor = warmup_cosine(total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5) and factor(100) == pytest.approx(0.0)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 100))
