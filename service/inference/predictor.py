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

from modelcontract import softmax
from service.errors import DeadlineExceededError, InvalidInputError
from service.inference.batching import DynamicBatcher
from service.inference.preprocessing import ImagePreprocessor
from service.metrics import ModelMetrics
from service.models.metadata import ModelMetadata

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedImage:
    """One uploaded file: a name for error messages and its encoded bytes."""

    name: str
    data: bytes


class Predictor:
    """Classifies images or client-preprocessed tensors with one model through the batcher."""

    def __init__(
        self,
        *,
        metadata: ModelMetadata,
        preprocessor: ImagePreprocessor,
        batcher: DynamicBatcher,
        metrics: ModelMetrics,
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

    async def preprocess(self, images: Sequence[NamedImage], deadline: float) -> np.ndarray:
        """Decode and transform every image on the decode threads; [N, C, H, W] float32.

        Each image is written straight into its row of the request's tensor. The first failure
        cancels the images not yet started, so a bad or late request stops costing decode time at once.
        """
        loop = asyncio.get_running_loop()
        tensor = np.empty((len(images), *self.metadata.input_shape), dtype=np.float32)
        jobs = [
            loop.run_in_executor(self._decode_executor, self._preprocess_one, image, deadline, row)
            for image, row in zip(images, tensor, strict=True)
        ]
        try:
            await asyncio.gather(*jobs)
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return tensor

    def _preprocess_one(self, image: NamedImage, deadline: float, row: np.ndarray) -> None:
        if time.monotonic() >= deadline:  # waited in the decode queue past the deadline: not worth decoding
            raise DeadlineExceededError(
                f"the request waited {self._timeout_s:g} s for decoding (CONVSERVE_REQUEST_TIMEOUT_S); "
                "the server is overloaded, retry later"
            )
        start = time.perf_counter()
        # The deadline also holds inside the decode: it stops at the first read of the file after it.
        self._preprocessor(image.data, image.name, out=row, deadline=deadline)
        self._metrics.preprocess_duration.observe(time.perf_counter() - start)

    def deadline(self, arrived_at: float, client_timeout_s: float | None = None) -> float:
        """The `time.monotonic()` time a request that arrived at `arrived_at` must be computed by."""
        return arrived_at + min(self._timeout_s, client_timeout_s or self._timeout_s)

    def check_room(self) -> None:
        """Refuse at once (503) when not even one more image could be admitted."""
        self._batcher.check_room(1)

    async def infer(self, tensor: np.ndarray, deadline: float) -> np.ndarray:
        """Logits for a checked tensor, through the batcher; `deadline` is a `time.monotonic()` time."""
        logits = await self._batcher.submit(tensor, deadline)
        self._record(softmax(logits))
        return logits

    async def classify_images(
        self, images: Sequence[NamedImage], top_k: int, arrived_at: float
    ) -> list[list[dict[str, Any]]]:
        """Top-k predictions for each image, in order; admitted (or refused) before any decoding."""
        self.check_top_k(top_k)
        deadline = self.deadline(arrived_at)
        with self._batcher.reserve(len(images)) as reservation:
            tensor = await self.preprocess(images, deadline)
            logits = await reservation.submit(tensor, deadline)
        return self._ranked(logits, top_k)

    async def classify_tensor(
        self, tensor: np.ndarray, top_k: int, arrived_at: float
    ) -> list[list[dict[str, Any]]]:
        """Top-k predictions for each row of a client-preprocessed tensor, in order."""
        self.check_top_k(top_k)
        deadline = self.deadline(arrived_at)
        return self._ranked(await self._batcher.submit(self.check_tensor(tensor), deadline), top_k)

    def _ranked(self, logits: np.ndarray, top_k: int) -> list[list[dict[str, Any]]]:
        """Records the predictions in the metrics, and returns the top-k of each row, best first."""
        probabilities = softmax(logits)
        self._record(probabilities)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        labels = self.metadata.labels
        return [
            [{"label": labels[i], "index": int(i), "score": float(row[i])} for i in indices]
            for row, indices in zip(probabilities, order, strict=True)
        ]

    def _record(self, probabilities: np.ndarray) -> None:
        for top1, confidence in zip(probabilities.argmax(axis=1), probabilities.max(axis=1), strict=True):
            self._metrics.count_prediction(self.metadata.labels[top1])
            self._metrics.prediction_confidence.observe(float(confidence))
