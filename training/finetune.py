"""Two-phase fine-tuning: the new head on a frozen base, then the top block groups unfrozen.

Both phases use AdamW with a linear warmup and a cosine decay and stop early when the validation loss
(plain cross-entropy, whatever the training label smoothing) has not improved for `patience` epochs.
The weights of the best validation epoch across both phases are kept: that state is exported.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.backbones import Classifier
from training.config import RunConfig
from training.freezing import freeze_base, parameter_groups, unfreeze_top

logger = logging.getLogger(__name__)

Batches = DataLoader[tuple[torch.Tensor, int]]


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


@dataclass
class FitResult:
    phases: list[PhaseRecord]
    best_state: dict[str, torch.Tensor]
    best_phase: str
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear ramp over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Runs epochs of one model on one device; mixed precision on CUDA, plain float32 on CPU."""

    def __init__(self, model: Classifier, config: RunConfig, device: torch.device) -> None:
        # channels_last convolutions measured 35% (frozen) / 16% (unfrozen) faster per step on CPU.
        self.model = model.to(device).to(memory_format=torch.channels_last)
        self.config = config
        self.device = device
        self.train_loss = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.val_loss = nn.CrossEntropyLoss(reduction="sum")
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    def _autocast(self) -> AbstractContextManager[object]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def _batches(self, loader: Batches, description: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # disable=None: a progress bar on a terminal, nothing in a captured log.
        for batch, labels in tqdm(loader, desc=description, leave=False, disable=None, unit="batch"):
            images = batch.to(self.device, memory_format=torch.channels_last, non_blocking=True)
            yield images, labels.to(self.device, non_blocking=True)

    def train_epoch(
        self,
        loader: Batches,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        description: str,
    ) -> tuple[float, float]:
        self.model.train()  # Classifier.train keeps a pretrained base's BatchNorm in inference mode
        total_loss, correct, seen = 0.0, 0, 0
        for images, labels in self._batches(loader, description):
            optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                logits = self.model(images)
                loss = self.train_loss(logits, labels)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
            scheduler.step()
            total_loss += loss.item() * len(labels)
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
        return total_loss / max(seen, 1), correct / max(seen, 1)

    @torch.no_grad()
    def predict(self, loader: Batches) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (float32, CPU) and labels of every sample, in loader order."""
        self.model.eval()
        outputs, targets = [], []
        for images, labels in self._batches(loader, "validate"):
            with self._autocast():
                outputs.append(self.model(images).float().cpu())
            targets.append(labels.cpu())
        return torch.cat(outputs), torch.cat(targets)

    def evaluate(self, loader: Batches) -> tuple[float, float]:
        logits, labels = self.predict(loader)
        loss = float(self.val_loss(logits, labels)) / len(labels)
        return loss, float((logits.argmax(dim=1) == labels).float().mean())


def _optimizer(model: Classifier, head_lr: float, base_lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, head_lr, base_lr, weight_decay))


def _current_lrs(optimizer: torch.optim.Optimizer) -> tuple[float, float | None]:
    head = next(g["lr"] for g in optimizer.param_groups if g["part"] == "head")
    base = next((g["lr"] for g in optimizer.param_groups if g["part"] == "base"), None)
    return float(head), None if base is None else float(base)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


class _BestTracker:
    """The best validation epoch so far, across both phases, and its weights.

    Best = highest validation accuracy, ties broken by lower validation loss: the exported model is
    judged by its accuracy, and the loss alone can rise while accuracy still improves (a few
    confidently wrong images dominate it).
    """

    def __init__(self) -> None:
        self.accuracy, self.loss = -1.0, math.inf
        self.state: dict[str, torch.Tensor] = {}
        self.phase, self.epoch = "", 0

    def offer(self, model: nn.Module, phase: str, epoch: int, accuracy: float, loss: float) -> bool:
        if (accuracy, -loss) <= (self.accuracy, -self.loss):
            return False
        self.accuracy, self.loss, self.phase, self.epoch = accuracy, loss, phase, epoch
        self.state = _snapshot(model)
        return True


def _run_phase(
    trainer: Trainer,
    record: PhaseRecord,
    *,
    epochs: int,
    lrs: tuple[float, float],
    loaders: tuple[Batches, Batches],
    best: _BestTracker,
) -> None:
    config, train_loader, val_loader = trainer.config, loaders[0], loaders[1]
    optimizer = _optimizer(trainer.model, lrs[0], lrs[1], config.weight_decay)
    steps = epochs * len(train_loader)
    warmup = min(steps // 2, max(1, round(config.warmup_epochs * len(train_loader))))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
    stale, phase_best_loss = 0, math.inf
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        description = f"{record.name} {epoch}/{epochs}"
        train_loss, train_accuracy = trainer.train_epoch(train_loader, optimizer, scheduler, description)
        val_loss, val_accuracy = trainer.evaluate(val_loader)
        head_lr, base_lr = _current_lrs(optimizer)
        entry = EpochRecord(
            epoch,
            train_loss,
            train_accuracy,
            val_loss,
            val_accuracy,
            head_lr,
            base_lr,
            time.perf_counter() - started,
        )
        record.epochs.append(entry)
        improved = best.offer(trainer.model, record.name, epoch, val_accuracy, val_loss)
        # Early stopping watches the validation loss, per phase: phase 2 gets its own patience.
        stale = 0 if val_loss < phase_best_loss else stale + 1
        phase_best_loss = min(phase_best_loss, val_loss)
        logger.info(
            "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.2e%s | %.1f s%s",
            record.name, epoch, epochs, train_loss, train_accuracy, val_loss, val_accuracy, head_lr,
            "" if base_lr is None else f" base {base_lr:.2e}", entry.seconds, " *best*" if improved else "",
        )  # fmt: skip
        if stale >= config.patience and epoch < epochs:
            record.stopped_early = True
            logger.info("%s phase: no lower val loss for %d epochs, stopping early", record.name, stale)
            break


def fine_tune(model: Classifier, config: RunConfig, train_loader: Batches, val_loader: Batches) -> FitResult:
    """Phase 1 (frozen base) then phase 2 (top block groups unfrozen); returns the best weights."""
    trainer = Trainer(model, config, resolve_device(config.device))
    best, phases = _BestTracker(), []
    loaders = (train_loader, val_loader)
    if config.frozen_epochs:
        freeze_base(model)
        phases.append(PhaseRecord("frozen", trainable_groups=[]))
        _run_phase(
            trainer,
            phases[-1],
            epochs=config.frozen_epochs,
            lrs=(config.head_lr, config.base_lr),
            loaders=loaders,
            best=best,
        )
        model.load_state_dict(best.state)  # phase 2 starts from the best head, not an overfit one
    if config.unfrozen_epochs > 0:
        groups = unfreeze_top(model, config.unfreeze_count)
        logger.info("unfrozen phase trains the head and block groups %s", groups)
        phases.append(PhaseRecord("unfrozen", trainable_groups=groups))
        lrs = (config.unfrozen_head_lr, config.base_lr)
        _run_phase(trainer, phases[-1], epochs=config.unfrozen_epochs, lrs=lrs, loaders=loaders, best=best)
    model.load_state_dict(best.state)
    model.to(memory_format=torch.contiguous_format)  # plain layout for export and checkpoints
    return FitResult(phases, best.state, best.phase, best.epoch, best.accuracy, best.loss)
