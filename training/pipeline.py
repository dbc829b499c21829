"""The `fit` and `export` commands as library calls: data -> model -> two phases -> verified export.

A run works in a run directory inside the model directory and is published as the next version with
one rename once its model is exported and verified (`training.runs`), so a crash, a failed parity check,
Ctrl-C or SIGTERM never leaves a half-written version behind for the service; a stopped run leaves the
checkpoint of its last completed epoch, and `resume` continues it. Under torchrun every process runs
`fit`; only rank 0 touches files.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelcontract import MODEL_FILENAME, EvalSpec, publish_version
from modelcontract.transform import FLOAT32
from training import runs
from training.backbone_defaults import backbone_defaults
from training.backbones import create_model
from training.checkpoint import (
    CHECKPOINT_FILENAME,
    eval_spec_of,
    load_checkpoint,
    progress_of,
    read_checkpoint,
    save_checkpoint,
)
from training.classifier import Classifier
from training.config import RunConfig
from training.data import Batches, LabelledImages, load_dataset, make_loaders, parity_inputs
from training.distributed import Ranks, process_group
from training.export import export_onnx
from training.finetune import FitResult, Progress, fine_tune
from training.report import build_metrics, onnx_validation, plot_training, write_metrics
from training.trainer import Trainer

logger = logging.getLogger(__name__)

RESUME_MAY_CHANGE = ("out", "workers", "device")
"""Options `resume` may change: where the result goes and how it runs, never what is trained."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _extra_metadata(config: RunConfig, dataset: LabelledImages) -> dict[str, Any]:
    return {
        "pretrained": config.pretrained,
        "train_images": len(dataset.train),
        "val_images": len(dataset.val),
        "skipped_images": len(dataset.skipped),
        "data": config.data,
    }


def fit(config: RunConfig, *, on_epoch_end: Callable[[Progress], None] | None = None) -> Path:
    """Fine-tune per `config` and publish `out/<version>/` (model.onnx, metrics, plot, checkpoint).

    Under torchrun every process calls this and gets the published directory back. `on_epoch_end`
    is called after each epoch's checkpoint is written (progress reports; raising stops the run).
    """
    with process_group(config.device) as ranks:
        config = replace(config.resolve(), world_size=ranks.world_size)
        return _run(_Run(config, ranks), on_epoch_end)


def resume(
    path: Path,
    changes: dict[str, Any] | None = None,
    *,
    on_epoch_end: Callable[[Progress], None] | None = None,
) -> Path:
    """Continue the run whose checkpoint is `path` (or a run/version directory holding one) from its
    last completed epoch, and publish it as the next version.

    `changes` are options given again: they must match the run's configuration, except `out`,
    `workers` and `device`. The run continues in its run directory when `path` is one.
    """
    checkpoint = read_checkpoint(path)
    progress = progress_of(checkpoint, path)
    directory = path if path.is_dir() else path.parent
    config = _resumed_config(RunConfig.from_json(checkpoint["config"]), directory, changes or {}, path)
    run_dir = (
        directory
        if runs.is_run_dir(directory) and directory.parent.resolve() == Path(config.out).resolve()
        else None
    )
    with process_group(config.device) as ranks:
        if ranks.world_size != config.world_size:
            raise ValueError(
                f"{path} was written by a run on {config.world_size} process(es); resume it on as many "
                f"(torchrun --nproc_per_node {config.world_size}, or no torchrun for 1): the shards and "
                f"the learning-rate schedule depend on it"
            )
        return _run(_Run(config, ranks, progress, checkpoint["labels"], run_dir), on_epoch_end)


def _resumed_config(stored: RunConfig, directory: Path, changes: dict[str, Any], path: Path) -> RunConfig:
    conflicts = [
        f"--{name.replace('_', '-')} {value} (the run has {getattr(stored, name)})"
        for name, value in changes.items()
        if name not in RESUME_MAY_CHANGE and getattr(stored, name) != value
    ]
    if conflicts:
        raise ValueError(
            f"--resume continues {path} with its own configuration, but "
            + "; ".join(conflicts)
            + ": drop those options (only --out, --workers and --device may change)"
        )
    return replace(
        stored,
        out=str(changes.get("out", directory.parent)),
        workers=int(changes.get("workers", stored.workers)),
        device=str(changes.get("device", stored.device)),
    )


@dataclass(frozen=True)
class _Run:
    config: RunConfig
    ranks: Ranks
    progress: Progress | None = None
    """Where a resumed run stands (None for a new run)."""
    labels: list[str] | None = None
    """The class names of a resumed run, which the dataset must still have."""
    run_dir: Path | None = None
    """The run directory of a resumed run to continue in (None: a new one)."""


def _run(run: _Run, on_epoch_end: Callable[[Progress], None] | None) -> Path:
    started = time.perf_counter()
    config, ranks = run.config, run.ranks
    seed_everything(config.seed)
    dataset = load_dataset(config.data, config.val_split, config.seed)
    if run.labels is not None and dataset.classes != run.labels:
        raise ValueError(
            f"{config.data} now has classes {dataset.classes} but the run trained on {run.labels}; "
            "resume with the same data"
        )
    model = create_model(
        config.backbone,
        len(dataset.classes),
        config.pretrained and run.progress is None,  # a resumed run has every weight in its checkpoint
        weights=Path(config.weights) if config.weights else None,
        drop_rate=config.drop_rate,
        freeze_batchnorm=config.pretrained,
    )
    defaults = backbone_defaults(config.backbone)
    spec = config.eval_spec(defaults.interpolation, defaults.mean, defaults.std)
    loaders = make_loaders(dataset, config, spec, ranks)
    logger.info("training %s on %s at %d px: %s", config.backbone, config.data, config.image_size, config)
    if not ranks.is_main:
        fine_tune(model, config, (loaders.train, loaders.val_shard), ranks, resume=run.progress)
        return Path(ranks.share(None))  # waits for rank 0 to publish

    run_dir = run.run_dir or runs.new_run_dir(Path(config.out))
    parity = parity_inputs(dataset, spec)

    def save(progress: Progress) -> None:
        best = max((e.val_accuracy for p in progress.phases for e in p.epochs), default=None)
        save_checkpoint(
            run_dir / CHECKPOINT_FILENAME,
            progress,
            config=config,
            labels=dataset.classes,
            spec=spec,
            parity_inputs=parity,
            val_accuracy=best,
        )

    def after_epoch(progress: Progress) -> None:
        save(progress)
        if on_epoch_end is not None:
            on_epoch_end(progress)

    try:
        with runs.sigterm_as_interrupt():
            shards = (loaders.train, loaders.val_shard)
            result = fine_tune(model, config, shards, ranks, resume=run.progress, on_epoch_end=after_epoch)
            runs.clear_outputs(run_dir)
            _write_outputs(
                run_dir,
                model=model,
                config=config,
                dataset=dataset,
                spec=spec,
                result=result,
                val_loader=loaders.val,
                parity_inputs=parity,
                started=started,
            )
            save(Progress(result.phases, result.best_state, None, None, None))  # finished: nothing to carry
            version_dir = publish_version(run_dir, Path(config.out))
    except BaseException as error:
        runs.leave(run_dir, error, ranks.world_size)
        raise
    logger.info("published %s in %.0f s", version_dir, time.perf_counter() - started)
    return Path(ranks.share(str(version_dir)))


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


def _write_outputs(
    run_dir: Path,
    *,
    model: Classifier,
    config: RunConfig,
    dataset: LabelledImages,
    spec: EvalSpec,
    result: FitResult,
    val_loader: Batches,
    parity_inputs: torch.Tensor,
    started: float,
) -> None:
    """model.onnx (verified), metrics.json, training.png and config.json of a finished run."""
    logits, labels = Trainer(model, config, Ranks(device=next(model.parameters()).device)).predict(val_loader)
    model.to(memory_format=torch.contiguous_format)
    extra = {"world_size": config.world_size, "effective_batch_size": config.effective_batch_size}
    metrics = build_metrics(
        result, dataset.classes, logits, labels, skipped_images=dataset.skipped, extra=extra
    )
    metadata = export_onnx(
        model,
        run_dir,
        labels=dataset.classes,
        eval_spec=spec,
        backbone=config.backbone,
        parity_inputs=parity_inputs,
        val_accuracy=metrics["val_accuracy"],
        extra_metadata=_extra_metadata(config, dataset),
    )
    metrics["parity_max_abs_diff"] = metadata.parity_max_abs_diff
    metrics.update(onnx_validation(run_dir / MODEL_FILENAME, val_loader, logits))
    metrics["wall_time_seconds"] = round(time.perf_counter() - started, 1)
    write_metrics(metrics, run_dir / "metrics.json")
    plot_training(metrics, run_dir / "training.png")
    config.write(run_dir / "config.json")
    _log_summary(result, metrics)


def export_checkpoint(path: Path, model_root: Path, input_dtype: str = FLOAT32) -> Path:
    """Re-export a `fit` checkpoint as the next version of `model_root` (`input_dtype`: `export_onnx`)."""
    model, checkpoint = load_checkpoint(path)

    def write(staging: Path) -> None:
        export_onnx(
            model,
            staging,
            labels=checkpoint["labels"],
            eval_spec=eval_spec_of(checkpoint),
            backbone=checkpoint["backbone"],
            parity_inputs=checkpoint["parity_inputs"],
            val_accuracy=checkpoint.get("val_accuracy"),
            extra_metadata={"exported_from": str(path)},
            input_dtype=input_dtype,
        )

    version_dir = _publish(model_root, write)
    logger.info("published %s from %s", version_dir, path)
    return version_dir
