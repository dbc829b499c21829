"""From request content to predictions: validate, preprocess off the event loop, batch, rank.

`Predictor` is what the routes talk to. Every check on client input happens here, before anything
reaches the batcher, so one client's bad request can never break a batch shared with others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.batching import DynamicBatcher
from service.errors import InvalidInputError
from service.metadata import ModelMetadata
from service.metrics import Metrics
from service.preprocessing import ImagePreprocessor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedImage:
    """One uploaded file: a name for error messages and its encoded bytes."""

    name: str
    data: bytes


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (numerically stable)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


class Predictor:
    """Classifies images or client-preprocessed tensors with one model through the batcher."""

    def __init__(
        self,
        *,
        metadata: ModelMetadata,
        preprocessor: ImagePreprocessor,
        batcher: DynamicBatcher,
        metrics: Metrics,
        decode_executor: ThreadPoolExecutor,
        request_timeout_s: float,
    ) -> None:
        self.metadata = metadata
        self._preprocessor = preprocessor
        self._batcher = batcher
        self._metrics = metrics
        self._decode_executor = decode_executor
        self._timeout_s = request_timeout_s

    def check_top_k(self, top_k: int) -> int:
        if not 1 <= top_k <= self.metadata.num_classes:
            raise InvalidInputError(
                f"top_k must be between 1 and {self.metadata.num_classes} (the class count), got {top_k}"
            )
        return top_k

    def check_tensor(self, tensor: np.ndarray) -> np.ndarray:
        """The tensor as float32 [N, C, H, W] if it fits the model; `InvalidInputError` saying why not."""
        expected = self.metadata.input_shape
        shape_text = f"[N, {expected[0]}, {expected[1]}, {expected[2]}]"
        if tensor.dtype.kind != "f" or tensor.dtype.itemsize != 4:
            raise InvalidInputError(f"the tensor must be float32 {shape_text}, got dtype {tensor.dtype}")
        if tensor.ndim != 4 or tuple(tensor.shape[1:]) != expected or tensor.shape[0] < 1:
            raise InvalidInputError(
                f"expected a tensor of shape {shape_text} with N >= 1, got {list(tensor.shape)}"
            )
        if not np.isfinite(tensor).all():
            raise InvalidInputError("the tensor contains NaN or Inf values; send finite numbers only")
        return tensor.astype(np.float32, copy=False)

    async def preprocess(self, images: Sequence[NamedImage]) -> np.ndarray:
        """Decode and transform every image on the decode threads; [N, C, H, W] float32."""
        loop = asyncio.get_running_loop()
        rows = await asyncio.gather(
            *(loop.run_in_executor(self._decode_executor, self._preprocess_one, image) for image in images)
        )
        return np.stack(rows)

    def _preprocess_one(self, image: NamedImage) -> np.ndarray:
        start = time.perf_counter()
        row = self._preprocessor(image.data, image.name)
        self._metrics.preprocess_duration.observe(time.perf_counter() - start)
        return row

    async def infer(self, tensor: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Logits for a checked tensor, through the batcher; `deadline` is a `time.monotonic()` time."""
        if deadline is None:
            deadline = time.monotonic() + self._timeout_s
        logits = await self._batcher.submit(tensor, deadline)
        self._record(logits)
        return logits

    async def classify_images(self, images: Sequence[NamedImage], top_k: int) -> list[list[dict[str, Any]]]:
        """Top-k predictions for each image, in order."""
        self.check_top_k(top_k)
        deadline = time.monotonic() + self._timeout_s
        tensor = await self.preprocess(images)
        return self.rank(await self.infer(tensor, deadline), top_k)

    async def classify_tensor(self, tensor: np.ndarray, top_k: int) -> list[list[dict[str, Any]]]:
        """Top-k predictions for each row of a client-preprocessed tensor, in order."""
        self.check_top_k(top_k)
        return self.rank(await self.infer(self.check_tensor(tensor)), top_k)

    def rank(self, logits: np.ndarray, top_k: int) -> list[list[dict[str, Any]]]:
        probabilities = softmax(logits)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        labels = self.metadata.labels
        return [
            [{"label": labels[i], "index": int(i), "score": float(row[i])} for i in indices]
            for row, indices in zip(probabilities, order, strict=True)
        ]

    def _record(self, logits: np.ndarray) -> None:
        probabilities = softmax(logits)
        for top1, confidence in zip(probabilities.argmax(axis=1), probabilities.max(axis=1), strict=True):
            self._metrics.predictions.labels(label=self.metadata.labels[top1]).inc()
            self._metrics.prediction_confidence.observe(float(confidence))
