"""One model, one device, one epoch at a time: a training pass and a validation pass.

Under torchrun each process trains on its shard of every epoch through DistributedDataParallel and
validates its shard of the validation set; the loss and accuracy sums are added over the processes,
so every process reports (and decides on) the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from tqdm import tqdm

from training.classifier import Classifier
from training.config import RunConfig
from training.data import Batches
from training.distributed import Ranks


class Trainer:
    """Runs epochs of one model on this process's device; mixed precision on CUDA, float32 on CPU."""

    def __init__(self, model: Classifier, config: RunConfig, ranks: Ranks) -> None:
        # channels_last convolutions measured 35% (frozen) / 16% (unfrozen) faster per step on CPU.
        self.model = model.to(ranks.device).to(memory_format=torch.channels_last)
        self.network: nn.Module = self.model
        """What the training pass runs: the model, or the model under DDP; see `wrap`."""
        self.config = config
        self.ranks = ranks
        self.device = ranks.device
        self.train_loss = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.val_loss = nn.CrossEntropyLoss(reduction="sum")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda")

    def wrap(self) -> None:
        """Re-wrap for data parallelism after the trainable parameters changed (freeze/unfreeze)."""
        self.network = self.ranks.wrap(self.model)

    def _autocast(self) -> AbstractContextManager[object]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def _batches(self, loader: Batches, description: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # disable=None: a progress bar on a terminal, nothing in a captured log (nor on ranks > 0).
        bar = tqdm(loader, desc=description, leave=False, disable=None if self.ranks.is_main else True)
        for batch, labels in bar:
            images = batch.to(self.device, memory_format=torch.channels_last, non_blocking=True)
            yield images, labels.to(self.device, non_blocking=True)

    def train_epoch(
        self,
        loader: Batches,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        description: str,
    ) -> tuple[float, float]:
        """One pass over this process's shard; mean loss and accuracy over every process's images."""
        self.network.train()  # Classifier.train keeps a pretrained base's BatchNorm in inference mode
        total_loss, correct, seen = 0.0, 0, 0
        for images, labels in self._batches(loader, description):
            optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                logits = self.network(images)
                loss = self.train_loss(logits, labels)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
            scheduler.step()
            total_loss += loss.item() * len(labels)
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
        if not self.model.freeze_batchnorm:
            self.ranks.average_buffers(self.model)  # BatchNorm trained on each shard: one model again
        total_loss, correct_total, seen_total = self.ranks.sum([total_loss, correct, seen])
        return total_loss / max(seen_total, 1), correct_total / max(seen_total, 1)

    @torch.no_grad()
    def predict(self, loader: Batches) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (float32, CPU) and labels of every sample of `loader`, in loader order."""
        self.model.eval()
        outputs, targets = [], []
        for images, labels in self._batches(loader, "validate"):
            with self._autocast():
                outputs.append(self.model(images).float().cpu())
            targets.append(labels.cpu())
        if not outputs:  # a shard can be empty when there are fewer validation images than processes
            return torch.empty(0, self.model.num_classes), torch.empty(0, dtype=torch.long)
        return torch.cat(outputs), torch.cat(targets)

    def evaluate(self, loader: Batches) -> tuple[float, float]:
        """Validation loss and accuracy over every process's shard of the validation set."""
        logits, labels = self.predict(loader)
        loss_sum = float(self.val_loss(logits, labels))
        correct = float((logits.argmax(dim=1) == labels).sum())
        loss_total, correct_total, count = self.ranks.sum([loss_sum, correct, len(labels)])
        return loss_total / count, correct_total / count
