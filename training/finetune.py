"""Two-phase fine-tuning: the new head on a frozen base, then the top block groups unfrozen.

Both phases use AdamW with a linear warmup and a cosine decay and stop early when the validation loss
(plain cross-entropy, whatever the training label smoothing) has not improved for `patience` epochs.
The weights of the best validation epoch across both phases are kept: that state is exported.

A run can be continued: after every epoch `on_epoch_end` receives the `Progress` (epoch records, best
and current weights, optimizer and scheduler state), and `fine_tune(..., resume=progress)` carries on
from there. Everything else is derived: the early-stopping counter and the best epoch from the records,
and each epoch's randomness from (seed, epoch, rank), so there is no RNG state to carry.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from training.classifier import Classifier
from training.config import RunConfig
from training.data import Batches
from training.distributed import Ranks
from training.freezing import freeze_base, parameter_groups, unfreeze_top
from training.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    """Head learning rate at the end of the epoch."""
    base_lr: float | None
    """Learning rate of the unfrozen base blocks at the end of the epoch (None when frozen)."""
    seconds: float


@dataclass
class PhaseRecord:
    name: str
    """"frozen" or "unfrozen"."""
    trainable_groups: list[str]
    """Block groups of the base that trained in this phase (first module name of each)."""
    epochs: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False

    def stale_epochs(self) -> int:
        """Epochs since the phase's lowest validation loss: the early-stopping counter."""
        losses = [epoch.val_loss for epoch in self.epochs]
        return len(losses) - 1 - losses.index(min(losses)) if losses else 0

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> PhaseRecord:
        epochs = [EpochRecord(**epoch) for epoch in values["epochs"]]
        return cls(values["name"], list(values["trainable_groups"]), epochs, bool(values["stopped_early"]))


@dataclass
class Progress:
    """A run after its last completed epoch: what a checkpoint stores to continue it exactly."""

    phases: list[PhaseRecord]
    """Every completed epoch so far, by phase."""
    best_state: dict[str, torch.Tensor]
    """Weights of the best epoch so far (the ones exported)."""
    model_state: dict[str, torch.Tensor] | None
    """Weights at the end of the last epoch; None once the run has finished."""
    optimizer_state: dict[str, Any] | None
    """The current phase's AdamW state; None once the run has finished."""
    scheduler_state: dict[str, Any] | None
    """The current phase's learning-rate schedule position; None once the run has finished."""


@dataclass
class FitResult:
    phases: list[PhaseRecord]
    best_state: dict[str, torch.Tensor]
    best_phase: str
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float


@dataclass(frozen=True)
class _Phase:
    name: str
    epochs: int
    head_lr: float


def _plan(config: RunConfig) -> list[_Phase]:
    phases = [
        _Phase("frozen", config.frozen_epochs or 0, config.head_lr),
        _Phase("unfrozen", config.unfrozen_epochs, config.unfrozen_head_lr),
    ]
    return [phase for phase in phases if phase.epochs > 0]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear ramp over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _schedule(
    model: Classifier, config: RunConfig, phase: _Phase, steps_per_epoch: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(parameter_groups(model, phase.head_lr, config.base_lr, config.weight_decay))
    steps = phase.epochs * steps_per_epoch
    warmup = min(steps // 2, max(1, round(config.warmup_epochs * steps_per_epoch)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))


def _current_lrs(optimizer: torch.optim.Optimizer) -> tuple[float, float | None]:
    head = next(g["lr"] for g in optimizer.param_groups if g["part"] == "head")
    base = next((g["lr"] for g in optimizer.param_groups if g["part"] == "base"), None)
    return float(head), None if base is None else float(base)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Each epoch's augmentation and dropout from (seed, epoch, rank): a resumed run replays exactly
    the epochs an uninterrupted one would, and the processes of a DDP run draw different numbers."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


class _BestTracker:
    """The best validation epoch so far, across both phases, and its weights.

    Best = highest validation accuracy, ties broken by lower validation loss: the exported model is
    judged by its accuracy, and the loss alone can rise while accuracy still improves (a few
    confidently wrong images dominate it). On resume it is replayed from the epoch records.
    """

    def __init__(self, phases: list[PhaseRecord], state: dict[str, torch.Tensor] | None) -> None:
        self.accuracy, self.loss = -1.0, math.inf
        self.phase, self.epoch = "", 0
        for phase in phases:
            for epoch in phase.epochs:
                self._better(phase.name, epoch.epoch, epoch.val_accuracy, epoch.val_loss)
        self.state: dict[str, torch.Tensor] = state or {}

    def _better(self, phase: str, epoch: int, accuracy: float, loss: float) -> bool:
        if (accuracy, -loss) <= (self.accuracy, -self.loss):
            return False
        self.accuracy, self.loss, self.phase, self.epoch = accuracy, loss, phase, epoch
        return True

    def offer(self, model: nn.Module, phase: str, epoch: int, accuracy: float, loss: float) -> bool:
        if not self._better(phase, epoch, accuracy, loss):
            return False
        self.state = {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
        return True


def _run_phase(
    trainer: Trainer,
    *,
    phases: list[PhaseRecord],
    phase: _Phase,
    schedule: tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR],
    loaders: tuple[Batches, Batches],
    best: _BestTracker,
    on_epoch_end: Callable[[Progress], None] | None,
) -> None:
    config, record, (optimizer, scheduler) = trainer.config, phases[-1], schedule
    for epoch in range(len(record.epochs) + 1, phase.epochs + 1):
        started = time.perf_counter()
        run_epoch = sum(len(p.epochs) for p in phases) + 1  # counts across phases, for fresh shuffles
        _seed_epoch(config.seed, run_epoch, trainer.ranks.rank)
        if isinstance(loaders[0].sampler, DistributedSampler):
            loaders[0].sampler.set_epoch(run_epoch)
        description = f"{record.name} {epoch}/{phase.epochs}"
        train_loss, train_accuracy = trainer.train_epoch(loaders[0], optimizer, scheduler, description)
        val_loss, val_accuracy = trainer.evaluate(loaders[1])
        head_lr, base_lr = _current_lrs(optimizer)
        seconds = time.perf_counter() - started
        entry = EpochRecord(
            epoch, train_loss, train_accuracy, val_loss, val_accuracy, head_lr, base_lr, seconds
        )
        record.epochs.append(entry)
        improved = best.offer(trainer.model, record.name, epoch, val_accuracy, val_loss)
        # Early stopping watches the validation loss, per phase: phase 2 gets its own patience.
        # Every process sees the same (summed) validation numbers, so all of them stop together.
        stale = record.stale_epochs()
        record.stopped_early = stale >= config.patience and epoch < phase.epochs
        logger.info(
            "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.2e%s | %.1f s%s",
            record.name, epoch, phase.epochs, train_loss, train_accuracy, val_loss, val_accuracy, head_lr,
            "" if base_lr is None else f" base {base_lr:.2e}", entry.seconds, " *best*" if improved else "",
        )  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(
                Progress(
                    phases,
                    best.state,
                    trainer.model.state_dict(),
                    optimizer.state_dict(),
                    scheduler.state_dict(),
                )
            )
        if record.stopped_early:
            logger.info("%s phase: no lower val loss for %d epochs, stopping early", record.name, stale)
            break


def _set_trainable(model: Classifier, phase: str, config: RunConfig) -> list[str]:
    if phase == "frozen":
        freeze_base(model)
        return []
    groups = unfreeze_top(model, config.unfreeze_count)
    logger.info("unfrozen phase trains the head and block groups %s", groups)
    return groups


def fine_tune(
    model: Classifier,
    config: RunConfig,
    loaders: tuple[Batches, Batches],
    ranks: Ranks,
    *,
    resume: Progress | None = None,
    on_epoch_end: Callable[[Progress], None] | None = None,
) -> FitResult:
    """Phase 1 (frozen base) then phase 2 (top block groups unfrozen); returns the best weights.

    `loaders` are (training, validation) batches of this process's shard; `resume` continues a run
    from its last completed epoch.
    """
    trainer = Trainer(model, config, ranks)
    phases = resume.phases if resume else []
    best = _BestTracker(phases, resume.best_state if resume else None)
    if resume is not None and resume.model_state is not None:
        model.load_state_dict(resume.model_state)
    trained = False
    for phase in _plan(config):
        record = next((r for r in phases if r.name == phase.name), None)
        if record is not None and (record.stopped_early or len(record.epochs) >= phase.epochs):
            continue  # finished before the interruption
        if record is None:
            if phases:
                model.load_state_dict(best.state)  # phase 2 starts from the best head, not an overfit one
            record = PhaseRecord(phase.name, trainable_groups=[])
            phases.append(record)
        record.trainable_groups = _set_trainable(model, phase.name, config)
        trainer.wrap()  # DDP registers the parameters that train now
        schedule = _schedule(model, config, phase, len(loaders[0]))
        if record.epochs and resume is not None and resume.optimizer_state is not None:
            schedule[0].load_state_dict(resume.optimizer_state)
            schedule[1].load_state_dict(resume.scheduler_state or {})
        trained = True
        _run_phase(
            trainer,
            phases=phases,
            phase=phase,
            schedule=schedule,
            loaders=loaders,
            best=best,
            on_epoch_end=on_epoch_end,
        )
    if resume is not None and not trained:
        logger.info("the checkpoint's run had finished: nothing left to train, exporting its best epoch")
    model.load_state_dict(best.state)
    model.to(memory_format=torch.contiguous_format)  # plain layout for export and checkpoints
    return FitResult(phases, best.state, best.phase, best.epoch, best.accuracy, best.loss)
