"""`checkpoint.pt`: the one file that can re-export a model and continue the run that made it.

`fit` rewrites it in its run directory after every completed epoch (atomically: a crash or Ctrl-C
mid-write leaves the previous epoch's file) and publishes the last one with the version. It holds
the best weights and everything `export` needs (labels, eval spec, parity images), and the run's
`Progress`: epoch records, plus the current weights, optimizer and schedule while the run is not done.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from modelcontract import EvalSpec
from training.backbones import create_model
from training.classifier import Classifier
from training.config import RunConfig
from training.finetune import PhaseRecord, Progress

CHECKPOINT_FILENAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "convserve-checkpoint/2"
_READABLE_FORMATS = ("convserve-checkpoint/1", CHECKPOINT_FORMAT)
"""Format 1 (before resume) has no progress: it can be re-exported but not resumed."""


def eval_spec_of(checkpoint: dict[str, Any]) -> EvalSpec:
    """The eval spec stored by `save_checkpoint` (its fields by name, sequences as lists or tuples)."""
    return EvalSpec(**checkpoint["eval_spec"])


def save_checkpoint(
    path: Path,
    progress: Progress,
    *,
    config: RunConfig,
    labels: list[str],
    spec: EvalSpec,
    parity_inputs: torch.Tensor,
    val_accuracy: float | None,
) -> None:
    """Write the checkpoint to `path` through a temporary file and one rename."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "backbone": config.backbone,
        "labels": labels,
        "drop_rate": config.drop_rate,
        "eval_spec": asdict(spec),
        "state_dict": progress.best_state,
        "config": config.to_json(),
        "parity_inputs": parity_inputs,
        "val_accuracy": val_accuracy,
        "progress": {
            "phases": [asdict(phase) for phase in progress.phases],
            "model_state": progress.model_state,
            "optimizer_state": progress.optimizer_state,
            "scheduler_state": progress.scheduler_state,
        },
    }
    partial = path.with_name(f".{path.name}.partial")
    torch.save(checkpoint, partial)
    os.replace(partial, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at `path` (a checkpoint.pt, or a run/version directory holding one)."""
    if path.is_dir():
        path = path / CHECKPOINT_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist (fit writes <out>/<version>/{CHECKPOINT_FILENAME}, and an "
            f"interrupted run leaves <out>/.run-*/{CHECKPOINT_FILENAME})"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in _READABLE_FORMATS:
        raise ValueError(f"{path} is not a checkpoint written by `python -m training fit`")
    return checkpoint


def progress_of(checkpoint: dict[str, Any], path: Path) -> Progress:
    """The run's progress, to continue it; raises ValueError for checkpoints that cannot resume."""
    stored = checkpoint.get("progress")
    if stored is None:
        raise ValueError(
            f"{path} was written before `fit --resume` existed; re-export it with `python -m training "
            "export --checkpoint`, or start a new run"
        )
    return Progress(
        phases=[PhaseRecord.from_json(phase) for phase in stored["phases"]],
        best_state=checkpoint["state_dict"],
        model_state=stored["model_state"],
        optimizer_state=stored["optimizer_state"],
        scheduler_state=stored["scheduler_state"],
    )


def load_checkpoint(path: Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model saved by `fit` (no pretrained weights needed: the state dict has them all)."""
    checkpoint = read_checkpoint(path)
    model = create_model(checkpoint["backbone"], len(checkpoint["labels"]), drop_rate=checkpoint["drop_rate"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval(), checkpoint
