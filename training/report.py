"""What a person looks at after a run: `metrics.json` (including how the exported file itself scores)
and `training.png`."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from matplotlib.figure import Figure

from modelcontract import INPUT_NAME, OUTPUT_NAME
from training.data import Batches
from training.finetune import FitResult

logger = logging.getLogger(__name__)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Rows are the true classes, columns the predicted ones, in class order."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.numpy(), predictions.numpy()), 1)
    return matrix


def build_metrics(
    result: FitResult,
    classes: list[str],
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    skipped_images: list[str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Metrics of the exported (best) model on the validation set, plus the per-epoch history."""
    predictions = logits.argmax(dim=1)
    matrix = confusion_matrix(predictions, labels, len(classes))
    support = matrix.sum(axis=1)
    per_class = {
        name: (float(matrix[i, i] / support[i]) if support[i] else None) for i, name in enumerate(classes)
    }
    return {
        "val_accuracy": float((predictions == labels).float().mean()),
        "val_loss": float(torch.nn.functional.cross_entropy(logits, labels)),
        "best": {
            "phase": result.best_phase,
            "epoch": result.best_epoch,
            "chosen_by": "val_accuracy, then val_loss",
        },
        "phases": [
            {
                "name": phase.name,
                "trainable_groups": phase.trainable_groups,
                "stopped_early": phase.stopped_early,
                "best_val_accuracy": max((e.val_accuracy for e in phase.epochs), default=None),
                "epochs": [asdict(epoch) for epoch in phase.epochs],
            }
            for phase in result.phases
        ],
        "per_class_accuracy": per_class,
        "confusion_matrix": {"labels": classes, "matrix": matrix.tolist()},
        "skipped_images": len(skipped_images),
        "skipped_files": skipped_images[:100],
        **extra,
    }


def onnx_validation(path: Path, val_loader: Batches, torch_logits: torch.Tensor) -> dict[str, float]:
    """Accuracy of the exported file itself on the whole validation set (not only the parity batch),
    and how often its top-1 agrees with PyTorch's."""
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


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def plot_training(metrics: dict[str, Any], path: Path) -> None:
    """Loss and accuracy per epoch over both phases (phase boundary marked) and the confusion matrix."""
    # A bare Figure renders to files with Agg and never touches pyplot's global state or a display.
    figure = Figure(figsize=(17, 5))
    loss_axis, accuracy_axis, matrix_axis = figure.subplots(1, 3)
    history = [(phase["name"], epoch) for phase in metrics["phases"] for epoch in phase["epochs"]]
    steps = np.arange(1, len(history) + 1)
    for axis, key, title in ((loss_axis, "loss", "loss"), (accuracy_axis, "accuracy", "accuracy")):
        axis.plot(steps, [e[f"train_{key}"] for _, e in history], "o-", label=f"train {key}")
        axis.plot(steps, [e[f"val_{key}"] for _, e in history], "s-", label=f"validation {key}")
        boundary = sum(1 for name, _ in history if name == "frozen")
        if 0 < boundary < len(history):
            axis.axvline(boundary + 0.5, color="grey", linestyle="--", label="unfreeze")
        axis.set_xlabel("epoch (both phases)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    names = metrics["confusion_matrix"]["labels"]
    matrix_axis.imshow(matrix, cmap="Blues")
    matrix_axis.set_title(f"confusion matrix (val accuracy {metrics['val_accuracy']:.3f})")
    matrix_axis.set_xlabel("predicted")
    matrix_axis.set_ylabel("true")
    if len(names) <= 30:  # beyond that the tick labels are unreadable anyway
        matrix_axis.set_xticks(range(len(names)), names, rotation=90)
        matrix_axis.set_yticks(range(len(names)), names)
        for (row, column), count in np.ndenumerate(matrix):
            if count:
                matrix_axis.text(column, row, str(count), ha="center", va="center", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
