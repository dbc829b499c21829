"""The `fit` and `export` commands as library calls: data -> model -> two phases -> verified export.

Everything for a run is written to a hidden staging directory inside the model directory and then
published as the next version with one rename, so a crash or a failed parity check never leaves a
half-written version behind for the service.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.backbones import Classifier, backbone_defaults, create_model
from training.config import RunConfig
from training.data import ImageDataset, LabelledImages, load_dataset
from training.export import export_onnx, publish_version
from training.finetune import Batches, FitResult, Trainer, fine_tune, resolve_device
from training.report import build_metrics, plot_training, write_metrics
from training.spec import INPUT_NAME, OUTPUT_NAME, EvalSpec
from training.transforms import eval_transform, train_transform

logger = logging.getLogger(__name__)

CHECKPOINT_FILENAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "convserve-checkpoint/1"
PARITY_IMAGES = 16
"""Validation images kept for the export parity check (and stored in the checkpoint for `export`)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loaders(dataset: LabelledImages, config: RunConfig, spec: EvalSpec) -> tuple[Batches, Batches]:
    generator = torch.Generator().manual_seed(config.seed)
    train = ImageDataset(dataset.train, train_transform(spec, config.augmentation()), dataset.skipped)
    val = ImageDataset(dataset.val, eval_transform(spec), dataset.skipped)
    train_loader = DataLoader(
        train,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=config.workers,
        # A last batch of one breaks BatchNorm layers that train (random-init bases).
        drop_last=len(train) > config.batch_size,
    )
    val_loader = DataLoader(val, batch_size=config.batch_size, shuffle=False, num_workers=config.workers)
    return train_loader, val_loader


def _parity_inputs(dataset: LabelledImages, spec: EvalSpec) -> torch.Tensor:
    """Real held-out images for the export check (topped up from training images if val is tiny)."""
    transform = eval_transform(spec)
    samples = (dataset.val + dataset.train)[: max(2, min(PARITY_IMAGES, len(dataset.val)))]
    return torch.stack([ImageDataset(samples, transform, dataset.skipped)[i][0] for i in range(len(samples))])


def _publish(model_root: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(staging_dir)` and publish the result as the next version; clean up on failure."""
    model_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_root))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; a service running as another user must read it
    try:
        write(staging)
        return publish_version(staging, model_root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published


def _checkpoint(
    model: Classifier, config: RunConfig, classes: list[str], spec: EvalSpec, **extra: Any
) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "backbone": config.backbone,
        "labels": classes,
        "drop_rate": config.drop_rate,
        "eval_spec": {
            "input_size": list(spec.input_size),
            "resize_size": spec.resize_size,
            "interpolation": spec.interpolation,
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config.to_json(),
        **extra,
    }


def _extra_metadata(config: RunConfig, dataset: LabelledImages) -> dict[str, Any]:
    return {
        "pretrained": config.pretrained,
        "train_images": len(dataset.train),
        "val_images": len(dataset.val),
        "skipped_images": len(dataset.skipped),
        "data": config.data,
    }


def fit(config: RunConfig) -> Path:
    """Fine-tune per `config` and publish `out/<version>/` (model.onnx, metrics, plot, checkpoint)."""
    started = time.perf_counter()
    config = config.resolve()
    seed_everything(config.seed)
    dataset = load_dataset(config.data, config.val_split, config.seed)
    weights = Path(config.weights) if config.weights else None
    model = create_model(
        config.backbone, len(dataset.classes), config.pretrained, weights=weights, drop_rate=config.drop_rate
    )
    defaults = backbone_defaults(config.backbone)
    spec = config.eval_spec(defaults.interpolation, defaults.mean, defaults.std)
    train_loader, val_loader = _loaders(dataset, config, spec)
    logger.info("training %s on %s at %d px: %s", config.backbone, config.data, config.image_size, config)

    result = fine_tune(model, config, train_loader, val_loader)
    logits, labels = Trainer(model, config, resolve_device(config.device)).predict(val_loader)
    parity_inputs = _parity_inputs(dataset, spec)

    def write(staging: Path) -> None:
        metrics = build_metrics(
            result, dataset.classes, logits, labels, skipped_images=dataset.skipped, extra={}
        )
        metadata = export_onnx(
            model,
            staging,
            labels=dataset.classes,
            eval_spec=spec,
            backbone=config.backbone,
            parity_inputs=parity_inputs,
            val_accuracy=metrics["val_accuracy"],
            extra_metadata=_extra_metadata(config, dataset),
        )
        metrics["parity_max_abs_diff"] = metadata["parity_max_abs_diff"]
        metrics.update(_onnx_validation(staging / "model.onnx", val_loader, logits))
        metrics["wall_time_seconds"] = round(time.perf_counter() - started, 1)
        write_metrics(metrics, staging / "metrics.json")
        plot_training(metrics, staging / "training.png")
        config.write(staging / "config.json")
        checkpoint = _checkpoint(
            model,
            config,
            dataset.classes,
            spec,
            parity_inputs=parity_inputs,
            val_accuracy=metrics["val_accuracy"],
        )
        torch.save(checkpoint, staging / CHECKPOINT_FILENAME)
        _log_summary(result, metrics)

    version_dir = _publish(Path(config.out), write)
    logger.info("published %s in %.0f s", version_dir, time.perf_counter() - started)
    return version_dir


def _onnx_validation(path: Path, val_loader: Batches, torch_logits: torch.Tensor) -> dict[str, float]:
    """Accuracy of the exported file itself on the whole validation set (not only the parity batch),
    and how often its top-1 agrees with PyTorch's."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    predictions, labels = [], []
    for images, batch_labels in val_loader:
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: images.contiguous().numpy()})[0]
        predictions.append(torch.from_numpy(logits).argmax(dim=1))
        labels.append(batch_labels)
    onnx_top1, truth = torch.cat(predictions), torch.cat(labels)
    agreement = float((onnx_top1 == torch_logits.argmax(dim=1)).float().mean())
    if agreement < 1.0:
        logger.warning("ONNX and PyTorch top-1 differ on %.2f%% of validation images", 100 * (1 - agreement))
    return {
        "onnx_val_accuracy": float((onnx_top1 == truth).float().mean()),
        "onnx_top1_agreement": agreement,
    }


def _log_summary(result: FitResult, metrics: dict[str, Any]) -> None:
    for phase in metrics["phases"]:
        logger.info("%s phase: best val accuracy %.4f", phase["name"], phase["best_val_accuracy"] or 0.0)
    logger.info(
        "exported the best epoch (%s %d): val accuracy %.4f, val loss %.4f; %d image(s) skipped",
        result.best_phase,
        result.best_epoch,
        metrics["val_accuracy"],
        metrics["val_loss"],
        metrics["skipped_images"],
    )


def load_checkpoint(path: Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model saved by `fit` (no pretrained weights needed: the state dict has them all)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist (fit writes <out>/<version>/{CHECKPOINT_FILENAME})"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by `python -m training fit`")
    model = create_model(checkpoint["backbone"], len(checkpoint["labels"]), drop_rate=checkpoint["drop_rate"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval(), checkpoint


def export_checkpoint(path: Path, model_root: Path) -> Path:
    """Re-export a `fit` checkpoint as the next version of `model_root`."""
    model, checkpoint = load_checkpoint(path)
    stored = checkpoint["eval_spec"]
    spec = EvalSpec(
        input_size=(stored["input_size"][0], stored["input_size"][1]),
        resize_size=stored["resize_size"],
        interpolation=stored["interpolation"],
        mean=tuple(stored["mean"]),
        std=tuple(stored["std"]),
    )

    def write(staging: Path) -> None:
        export_onnx(
            model,
            staging,
            labels=checkpoint["labels"],
            eval_spec=spec,
            backbone=checkpoint["backbone"],
            parity_inputs=checkpoint["parity_inputs"],
            val_accuracy=checkpoint.get("val_accuracy"),
            extra_metadata={"exported_from": str(path)},
        )

    version_dir = _publish(model_root, write)
    logger.info("published %s from %s", version_dir, path)
    return version_dir
