"""Which parameters train in each phase, and the optimizer parameter groups that follow from it.

Phase 1 ("frozen"): only the head trains. Phase 2 ("unfrozen"): the head and the top N block groups
of the base. BatchNorm running statistics of a pretrained base never move in either phase: that is
`Classifier.freeze_batchnorm`, which keeps those layers in inference mode through `model.train()`.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from training.classifier import Classifier


def _in_group(parameter_name: str, group: list[str]) -> bool:
    return any(parameter_name == prefix or parameter_name.startswith(prefix + ".") for prefix in group)


def group_index(model: Classifier, parameter_name: str) -> int | None:
    """Index in `model.block_groups` of a base parameter (None when no group claims it)."""
    for index, group in enumerate(model.block_groups):
        if _in_group(parameter_name, group):
            return index
    return None


def top_groups(model: Classifier, count: int | None) -> list[int]:
    """Indices of the top `count` block groups (None = all of them)."""
    total = len(model.block_groups)
    count = total if count is None else min(count, total)
    return list(range(total - count, total))


def freeze_base(model: Classifier) -> None:
    """Phase 1: no gradient for any base parameter; the head trains."""
    for parameter in model.base.parameters():
        parameter.requires_grad_(False)
    for parameter in model.head.parameters():
        parameter.requires_grad_(True)


def unfreeze_top(model: Classifier, count: int | None) -> list[str]:
    """Phase 2: unfreeze the top `count` block groups (None = the whole base); returns their names.

    With `count=None` every base parameter trains, including any no block group claims.
    """
    chosen = set(top_groups(model, count))
    for name, parameter in model.base.named_parameters():
        index = group_index(model, name)
        parameter.requires_grad_(count is None or (index is not None and index in chosen))
    return [model.block_groups[i][0] for i in sorted(chosen)]


def trainable_base_parameters(model: Classifier) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.base.named_parameters() if p.requires_grad)


def parameter_groups(
    model: Classifier, head_lr: float, base_lr: float, weight_decay: float
) -> list[dict[str, object]]:
    """AdamW groups: head at `head_lr`, trainable base at `base_lr` (discriminative rates).

    Biases and normalization weights (1-D tensors) get no weight decay, as usual for AdamW.
    """
    groups: list[dict[str, object]] = []
    parts = [
        ("head", model.head.named_parameters(), head_lr),
        ("base", trainable_base_parameters(model), base_lr),
    ]
    for part, named, lr in parts:
        trainable = [p for _, p in named if p.requires_grad]
        decay = [p for p in trainable if p.dim() > 1]
        no_decay = [p for p in trainable if p.dim() <= 1]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "part": part})
    return groups
