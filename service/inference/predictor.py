"""The one path every inference request takes, whatever protocol it came by.

A protocol (`/predict`, V2 REST, and any future one) translates its request into an
`InferenceRequest` — how to receive the payload, how to parse it — and its answer back from the
logits; everything in between is decided here, once:

1. admission: refused at once (503) when not even one more image fits the queue, before any of the
   body is read;
2. receive: the payload, read within its bounds on the event loop (the protocol's `receive`);
3. parse: decompressing and parsing on the decode threads, never the event loop (the protocol's
   `parse`), into `Inputs` — encoded images or a preprocessed tensor — and what the protocol needs
   again for its answer;
4. deadline: the server's request timeout, shortened by the client's own if its protocol carries one;
5. validation and inference: images are admitted by count, then decoded into their rows of one
   tensor; tensors are checked against the model's input; then one trip through the batcher.

Every check on client input happens before anything reaches the batcher, so one client's bad request
can never break a batch shared with others.

A request may want some of the model's other named outputs besides the logits (`Inputs.outputs`, see
`service.models.runtime.extra_outputs`): they are checked against the model before the batcher sees
them, and the request shares its batch with plain predictions, the batch fetching the union of what
its requests asked for. The embedding comes back at unit length (`ModelMetadata.unit_embeddings`)
whichever way it was asked for: `classify(..., embeddings=True)` for `/predict`, by name for V2, and
`embed_images` for encoded images. `explain` takes the same path with images and the feature maps;
the class activation maps of the classes asked for are made here from the rows of this request alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image

from modelcontract import EMBEDDING_NAME, FEATURES_NAME, ModelMetadata
from service.errors import DeadlineExceededError, InvalidInputError
from service.inference.batching import DynamicBatcher, InferFn, LoneRun, Reservation
from service.inference.preprocessing import ImagePreprocessor
from service.metrics import ModelMetrics
from service.models.runtime import check_outputs
from service.settings import Settings
from service.textsafety import printable

logger = logging.getLogger(__name__)

T = TypeVar("T")
Payload = TypeVar("Payload")
Parsed = TypeVar("Parsed")


@dataclass(frozen=True)
class NamedImage:
    """One uploaded file: a name for error messages and its encoded bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Inputs:
    """What one request asks the model to compute: encoded images, or a preprocessed tensor."""

    images: Sequence[NamedImage] = ()
    tensor: np.ndarray | None = None
    timeout_s: float | None = None
    """The client's own time limit, when its protocol carries one; the server's limit still applies."""
    outputs: frozenset[str] = frozenset()
    """Named outputs of the model the request wants besides the logits (its embedding, say)."""


@dataclass(frozen=True)
class ModelOutputs:
    """What the model computed for one request's rows, in their order."""

    logits: np.ndarray
    """[N, num_classes]: the model's main output."""
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)
    """The named outputs the request asked for, each [N, ...]; the embedding at unit length."""


@dataclass(frozen=True)
class ClassMap:
    """One image's class activation map for one class, and what is needed to place it on the image."""

    image: int
    """The image's position in the request."""
    index: int
    label: str
    score: float
    cam: np.ndarray = field(repr=False)
    """The raw map [h, w] over the model's crop (the feature map's resolution), unnormalized."""
    size: tuple[int, int]
    """(width, height) of the image as sent, upright: the pixels the crop box is given in."""


_PIXEL_CHECK_VALUES = 1 << 20
"""Values `uint8_pixels` checks at once: its temporaries stay a few MiB whatever the tensor's size."""


def uint8_pixels(values: np.ndarray, what: str) -> np.ndarray:
    """`values` (numbers of any dtype) as uint8, when every one is a whole number in 0..255; else 422.

    A uint8 model's pixels may arrive as numbers of another dtype (JSON has no integer width): they
    are taken when they are pixel values, and refused naming the first that is not. Checked in slices,
    so the peak is the input and its uint8 copy, not several temporaries of the input's size."""
    if values.dtype == np.uint8:
        return values
    flat = values.reshape(-1)
    pixels = np.empty(flat.size, dtype=np.uint8)
    for start in range(0, flat.size, _PIXEL_CHECK_VALUES):
        part = flat[start : start + _PIXEL_CHECK_VALUES]
        bad = (part < 0) | (part > 255) | (part != np.floor(part))
        if bad.any():
            first = part[int(np.argmax(bad))]
            raise InvalidInputError(
                f"{what} must hold UINT8 pixel values, whole numbers from 0 to 255; got {first.item()!r}"
            )
        pixels[start : start + len(part)] = part
    return pixels.reshape(values.shape)


ClassMapsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(one image's feature map [C, h, w], class indices [k]) -> class activation maps [k, h, w]."""


@dataclass(frozen=True)
class InferenceRequest(Generic[Payload, Parsed]):
    """One request as its protocol hands it over: when it arrived, how to receive it and parse it."""

    arrived_at: float
    """`time.monotonic()` when the request's head arrived: its deadline counts from here."""
    receive: Callable[[], Awaitable[Payload]]
    """Reads the payload within its bounds, on the event loop."""
    parse: Callable[[Payload], tuple[Inputs, Parsed]]
    """Payload -> model inputs and whatever the protocol needs to answer; runs on a decode thread."""
    parse_on_loop: bool = False
    """True when `parse` does constant work (the payload is already parsed): skips the thread hop."""


class Predictor:
    """Runs inference requests of every protocol for one model version, through its batcher."""

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
        self.batcher = batcher
        self._preprocessor = preprocessor
        self._metrics = metrics
        self._decode_executor = decode_executor
        self._timeout_s = request_timeout_s

    @classmethod
    async def start(
        cls,
        metadata: ModelMetadata,
        infer: InferFn,
        settings: Settings,
        metrics: ModelMetrics,
        decode_executor: ThreadPoolExecutor,
        *,
        max_batch_size: int | None = None,
        batch_sizes: tuple[int, ...] | None = None,
        instances: int = 1,
        lone_batches: bool = False,
    ) -> Predictor:
        """The predictor of a loaded, warmed-up model (`infer` runs one batch), its batcher running.

        `max_batch_size` caps the batches below CONVSERVE_MAX_BATCH_SIZE for a model whose graph takes
        fewer rows (a fixed batch axis); None = the setting. `batch_sizes` are the only sizes to form
        (a model on a GPU: batches are padded to the next one); None = any size. `instances` batches
        are computed at once; with `lone_batches`, `infer` takes `alone=True` (see `DynamicBatcher`)."""
        batcher = DynamicBatcher(
            infer,
            batch_sizes=batch_sizes,
            max_batch_size=settings.max_batch_size if max_batch_size is None else max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_s,
            max_queue_size=settings.max_queue_size,
            instances=instances,
            metrics=metrics,
            lone_batches=lone_batches,
        )
        await batcher.start()
        preprocessor = ImagePreprocessor.from_metadata(
            metadata, max_pixels=settings.max_image_pixels, max_decoded_pixels=settings.max_decoded_pixels
        )
        return cls(
            metadata=metadata,
            preprocessor=preprocessor,
            batcher=batcher,
            metrics=metrics,
            decode_executor=decode_executor,
            request_timeout_s=settings.request_timeout_s,
        )

    async def close(self) -> None:
        """Finish every accepted request, then stop the batcher."""
        await self.batcher.close(timeout_s=self._timeout_s)

    # ---- the request path -------------------------------------------------------------------------

    async def run(self, request: InferenceRequest[Any, Parsed]) -> tuple[ModelOutputs, Parsed]:
        """The outputs of one request (the logits, and the named outputs its `Inputs` ask for), in the
        order of its rows, and what its protocol parsed."""
        outputs, _, parsed = await self._infer(request)
        return outputs, parsed

    async def classify(
        self, request: InferenceRequest[Any, Parsed], top_k: int, embeddings: bool = False
    ) -> tuple[list[list[dict[str, Any]]], np.ndarray | None, Parsed]:
        """The top-k classes of every row, best first, and with `embeddings` the rows' unit-length
        embeddings [N, D] (else None); both are checked before anything is read."""
        self.check_top_k(top_k)
        name = self.embedding_output() if embeddings else None
        outputs, probabilities, parsed = await self._infer(request, frozenset({name} if name else ()))
        unit = None if name is None else outputs.extra[name]
        return self.ranked(probabilities, top_k), unit, parsed

    async def embed_images(
        self, images: Sequence[NamedImage], deadline: float, background: bool = False
    ) -> np.ndarray:
        """The unit-length embeddings [N, D] float32 of encoded images, in their order: admitted before
        decoding, decoded and batched as predictions are; `deadline` is a `time.monotonic()` time.
        `background`: the work yields to requests (decoded one image at a time, batched as background
        rows: `DynamicBatcher`). `InvalidInputError` (422) when the model has no embedding or no image."""
        name = self.embedding_output()
        if not images:
            raise InvalidInputError("no image to embed; send at least one encoded image")
        inputs = Inputs(images=images, outputs=frozenset({name}))
        outputs = await self._compute(inputs, deadline, background)
        return np.asarray(outputs.extra[name])

    async def explain(
        self,
        request: InferenceRequest[Any, Parsed],
        class_maps: ClassMapsFn,
        classes: Sequence[int] | None = None,
    ) -> tuple[list[ClassMap], Parsed]:
        """The class activation maps of each image for `classes` (None: its top-1), image by image, in
        the order of `classes`; `class_maps` is the model's (`OnnxModel.class_maps`). Images only."""
        wanted = None if classes is None else np.asarray(self.check_classes(classes), dtype=np.int64)
        features_name = self.metadata.explain_output or FEATURES_NAME
        self.check_outputs({features_name})
        inputs, parsed, deadline = await self._receive(request)
        if inputs.tensor is not None or not inputs.images:
            raise InvalidInputError("explanations need the images themselves, as multipart/form-data files")
        with self.batcher.reserve(len(inputs.images)) as reservation:  # admitted before decoding
            logits, extra, sizes = await self._decode_and_compute(
                reservation, inputs.images, deadline, frozenset({features_name})
            )
        features = extra[features_name]
        probabilities = self.metadata.scores(logits)
        self._record(probabilities)
        labels = self.metadata.labels

        def make_maps() -> list[ClassMap]:  # up to 16 classes x the queue's images: off the loop
            maps: list[ClassMap] = []
            for image, (row, size) in enumerate(zip(probabilities, sizes, strict=True)):
                indices = np.asarray([int(row.argmax())]) if wanted is None else wanted
                cams = class_maps(features[image], indices)
                maps.extend(
                    ClassMap(image, int(i), labels[i], float(row[i]), cam, size)
                    for i, cam in zip(indices, cams, strict=True)
                )
            return maps

        return await self.offload(make_maps), parsed

    async def photo(self, image: NamedImage, arrived_at: float) -> Image.Image:
        """The image decoded upright as RGB within the request's deadline and the decode bounds (a large
        JPEG at reduced size), on the decode threads: for an answer drawn over it."""
        deadline = self.deadline(arrived_at)
        return await self.offload(lambda: self._preprocessor.decode(image.data, image.name, deadline))

    async def offload(self, work: Callable[[], T]) -> T:
        """Run CPU-bound `work` for a request's answer (rendering, say) on the decode threads."""
        return await asyncio.get_running_loop().run_in_executor(self._decode_executor, work)

    def check_outputs(self, names: Iterable[str]) -> frozenset[str]:
        """The named outputs, each one this model has; `InvalidInputError` (422) saying how to get one.
        Checked before a request reaches the batcher: a name the model lacks would fail its whole batch."""
        wanted = frozenset(names)
        check_outputs(self.metadata, wanted, "this model version")
        return wanted

    def embedding_output(self) -> str:
        """The name of the model's embedding output; `InvalidInputError` (422) when it has none."""
        name = self.metadata.embedding_output or EMBEDDING_NAME
        self.check_outputs({name})
        return name

    def check_classes(self, classes: Sequence[int]) -> list[int]:
        """The class indices, each checked against the class count; `InvalidInputError` saying why not."""
        bad = [c for c in classes if not 0 <= c < self.metadata.num_classes]
        if not classes or bad:
            raise InvalidInputError(
                f"class indices must be between 0 and {self.metadata.num_classes - 1} (the class count "
                f"less one), got {printable(str(bad or list(classes)), 80)}"
            )
        return list(classes)

    async def _receive(self, request: InferenceRequest[Any, Parsed]) -> tuple[Inputs, Parsed, float]:
        """Admission, the payload and its parse, and the request's deadline."""
        self.batcher.check_room(1)  # overloaded: refuse before reading the body
        payload = await request.receive()
        if request.parse_on_loop:
            inputs, parsed = request.parse(payload)
        else:  # tens of MB of JSON or gzip: never on the event loop
            loop = asyncio.get_running_loop()
            inputs, parsed = await loop.run_in_executor(self._decode_executor, request.parse, payload)
        return inputs, parsed, self.deadline(request.arrived_at, inputs.timeout_s)

    async def _infer(
        self, request: InferenceRequest[Any, Parsed], extra: frozenset[str] = frozenset()
    ) -> tuple[ModelOutputs, np.ndarray, Parsed]:
        """The model's outputs (with `extra` and the outputs the request's `Inputs` name) and their class
        probabilities (computed once: the metrics and the ranking both read them)."""
        inputs, parsed, deadline = await self._receive(request)
        outputs = await self._compute(replace(inputs, outputs=inputs.outputs | extra), deadline)
        probabilities = self.metadata.scores(outputs.logits)
        self._record(probabilities)
        return outputs, probabilities, parsed

    async def _compute(self, inputs: Inputs, deadline: float, background: bool = False) -> ModelOutputs:
        """Check, admit, decode and batch one request's inputs; its outputs in the order of its rows.
        `background`: see `embed_images`."""
        extra = self.check_outputs(inputs.outputs)
        if inputs.tensor is not None:
            tensor = self.check_tensor(inputs.tensor)
            with self.batcher.reserve(len(tensor)) as reservation:
                logits, fetched = await reservation.submit_with(tensor, deadline, extra)
        else:
            with self.batcher.reserve(len(inputs.images)) as reservation:  # admitted before decoding
                logits, fetched, _ = await self._decode_and_compute(
                    reservation, inputs.images, deadline, extra, background
                )
        embedding = self.metadata.embedding_output
        if embedding in fetched:  # the one place an embedding is scaled to unit length, for every protocol
            fetched[embedding] = self.metadata.unit_embeddings(fetched[embedding])
        return ModelOutputs(logits, fetched)

    # ---- the steps ----------------------------------------------------------------------------------

    def check_top_k(self, top_k: int) -> None:
        if not 1 <= top_k <= self.metadata.num_classes:
            raise InvalidInputError(
                f"top_k must be between 1 and {self.metadata.num_classes} (the class count), got {top_k}"
            )

    def check_tensor(self, tensor: np.ndarray) -> np.ndarray:
        """The tensor as [N, C, H, W] of the model's input dtype (float32; or uint8 for a model that
        normalizes in its graph, which takes numbers of any dtype that are whole and in 0..255) if it
        fits the model; `InvalidInputError` saying why not."""
        expected = self.metadata.input_shape
        shape_text = f"[N, {expected[0]}, {expected[1]}, {expected[2]}]"
        pixels = self.metadata.input_dtype == "uint8"
        if pixels and tensor.dtype.kind not in "fiu":
            raise InvalidInputError(f"the tensor must be uint8 {shape_text}, got dtype {tensor.dtype}")
        if not pixels and (tensor.dtype.kind != "f" or tensor.dtype.itemsize != 4):
            raise InvalidInputError(f"the tensor must be float32 {shape_text}, got dtype {tensor.dtype}")
        if tensor.ndim != 4 or tuple(tensor.shape[1:]) != expected or tensor.shape[0] < 1:
            raise InvalidInputError(
                f"expected a tensor of shape {shape_text} with N >= 1, got {list(tensor.shape)}"
            )
        if pixels:  # JSON numbers arrive as floats: whole values 0..255 are pixels
            return uint8_pixels(tensor, "the tensor")
        if not np.isfinite(tensor).all():
            raise InvalidInputError("the tensor contains NaN or Inf values; send finite numbers only")
        return tensor.astype(np.float32, copy=False)

    def deadline(self, arrived_at: float, client_timeout_s: float | None = None) -> float:
        """The `time.monotonic()` time a request that arrived at `arrived_at` must be computed by."""
        return arrived_at + min(self._timeout_s, client_timeout_s or self._timeout_s)

    async def preprocess(self, images: Sequence[NamedImage], deadline: float) -> np.ndarray:
        """Decode and transform every image on the decode threads; [N, C, H, W] of the model's input
        dtype (float32, or uint8 pixels for a model that normalizes in its graph).

        Each image is written straight into its row of the request's tensor. The first failure
        cancels the images not yet started, so a bad or late request stops costing decode time at once.
        """
        return (await self._decode_all(images, deadline))[0]

    async def _decode_and_compute(
        self,
        reservation: Reservation,
        images: Sequence[NamedImage],
        deadline: float,
        extra: frozenset[str],
        background: bool = False,
    ) -> tuple[np.ndarray, dict[str, np.ndarray], list[tuple[int, int]]]:
        """Decode the reserved `images` and compute them: the logits, the named outputs `extra`, and
        each image's upright (width, height) as sent. `background`: see `embed_images`.

        A lone image (nothing else admitted, nothing computing) is decoded on every core — the decode
        threads that have nothing else to do resample it in bands — and computed by the thread that
        decoded it as soon as it is ready, on every core too, unless another request was admitted
        meanwhile (`DynamicBatcher.lone_run`): it is then batched with the others. With a queue delay it
        takes neither shortcut: it is decoded on one thread and waits in the queue for company, as that
        setting promises. Under load each image keeps to one thread and goes through the queue, which is
        cheaper per image."""
        lone = None if background or len(images) != 1 else self.batcher.lone_run(reservation, extra)
        if lone is None:
            tensor, sizes = await self._decode_all(images, deadline, one_at_a_time=background)
            logits, fetched = await reservation.submit_with(tensor, deadline, extra, background)
            return logits, fetched, sizes
        tensor = np.empty((1, *self.metadata.input_shape), dtype=self.metadata.input_dtype)
        size, computed = await asyncio.get_running_loop().run_in_executor(
            self._decode_executor, self._decode_then_compute, images[0], deadline, tensor, lone
        )
        if computed is None:  # no longer alone (or late): the queue batches it, or refuses it
            computed = await reservation.submit_with(tensor, deadline, extra)
        return *computed, [size]

    def _decode_then_compute(
        self, image: NamedImage, deadline: float, tensor: np.ndarray, lone: LoneRun
    ) -> tuple[tuple[int, int], tuple[np.ndarray, dict[str, np.ndarray]] | None]:
        size = self._preprocess_one(image, deadline, tensor[0], helper=self._decode_executor)
        return size, lone.compute(tensor, deadline)

    async def _decode_all(
        self, images: Sequence[NamedImage], deadline: float, one_at_a_time: bool = False
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """`preprocess`, and each image's upright (width, height) as sent, each image on one decode
        thread. `one_at_a_time` holds one decode thread at most, so the requests' images never queue
        behind this request's."""
        loop = asyncio.get_running_loop()
        tensor = np.empty((len(images), *self.metadata.input_shape), dtype=self.metadata.input_dtype)
        if one_at_a_time:
            sizes = [
                await loop.run_in_executor(self._decode_executor, self._preprocess_one, image, deadline, row)
                for image, row in zip(images, tensor, strict=True)
            ]
            return tensor, sizes
        jobs = [
            loop.run_in_executor(self._decode_executor, self._preprocess_one, image, deadline, row)
            for image, row in zip(images, tensor, strict=True)
        ]
        try:
            sizes = await asyncio.gather(*jobs)
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return tensor, list(sizes)

    def _preprocess_one(
        self, image: NamedImage, deadline: float, row: np.ndarray, helper: Executor | None = None
    ) -> tuple[int, int]:
        if time.monotonic() >= deadline:  # waited in the decode queue past the deadline: not worth decoding
            raise DeadlineExceededError(
                f"the request waited {self._timeout_s:g} s for decoding (CONVSERVE_REQUEST_TIMEOUT_S); "
                "the server is overloaded, retry later"
            )
        start = time.perf_counter()
        # The deadline also holds inside the decode: it stops at the first read of the file after it.
        size = self._preprocessor.transform_into(image.data, image.name, row, deadline, helper)
        self._metrics.preprocess_duration.observe(time.perf_counter() - start)
        return size

    def ranked(self, probabilities: np.ndarray, top_k: int) -> list[list[dict[str, Any]]]:
        """The top-k of each row, best first, as `{"label", "index", "score"}`."""
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
