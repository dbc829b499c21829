"""Image bytes -> the model's input tensor: a bounded decode, then the training evaluation transform.

The transform is `modelcontract.transform.EvalTransform`, the same object training evaluation runs,
so serving and evaluation agree by construction on a decoded image. What this module adds is the
decode of an uploaded file, whose cost is bounded before it is paid, from the header alone:
- the declared area must fit `max_pixels` (decompression bombs);
- the aspect ratio must fit `MAX_ASPECT_RATIO`: the resize output is `resize_size`² times the ratio,
  so the cap bounds it (a 4000x1 strip would otherwise become 1,024,000x256), and no model can use
  the 5 % of such a strip that its center crop keeps;
- JPEGs are decoded at reduced size when the target is much smaller (DCT scaling, Pillow's draft
  mode, down to `DRAFT_MARGIN` x the resize size), and the pixels that will really be decoded must fit
  `max_decoded_pixels` (PNG, WebP, BMP, GIF and lossless JPEG have no reduced decoding and pay for
  every pixel);
- what the file's structure costs besides its pixels (scans, metadata, chunks, run-length codes) and
  the decode as a whole must fit the CPU and memory budget of `service.inference.decodecost`, which reads the
  structure before Pillow does;
- the request's deadline holds during the decode: Pillow reads the file through `_DeadlineFile`,
  which stops it at the first read after the deadline.
Then EXIF orientation, and conversion of grayscale, palette, RGBA, CMYK and 16-bit images to 8-bit RGB.
A model whose metadata says `input_dtype` "uint8" normalizes in its graph: its rows are the cropped
pixels as uint8, written without the transform's lookup table.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from modelcontract import EvalTransform, ModelMetadata
from service.errors import DeadlineExceededError, InvalidInputError
from service.inference import decodecost

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 40_000_000
"""Largest accepted declared image area in pixels (8000x5000), checked from the header before decoding."""
# 2048x2048: a PNG of that size decodes in ~90 ms on one core here (zlib), ten times a 2-MP JPEG
# decoded with DCT scaling; a JPEG only reaches it when it declares more than 64x that area.
MAX_DECODED_PIXELS = 4_194_304
"""Largest area actually decoded, in pixels: after draft reduction for JPEGs, the full size otherwise."""
# How far DCT scaling may shrink a JPEG: to 1.25x the resize size, so the resize filter still does
# real work. Drafting all the way down to the resize size gave a mean absolute difference from a full
# decode of 0.011 (normalized units) on the benchmark photos, 0.028 on the worst; at 1.25x, 0.005 and
# 0.009 (the transform lays out resize and crop on the full picture either way).
DRAFT_MARGIN = 1.25
MAX_ASPECT_RATIO = 20.0
"""Largest longer-side / shorter-side ratio accepted."""
# Pillow opens multi-picture JPEGs (phone cameras) through "JPEG" and reports their format as "MPO".
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# The EXIF orientations and the transpose that shows each upright, as ImageOps.exif_transpose does.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow decodes (as torchvision's loader does, alpha is dropped)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I->L conversion clips at 255 instead of scaling, which turns a 16-bit image white.
        # round(v / 257) is (v + 128) // 257 for every integer v (v / 257 is never a tie): int32 holds
        # the temporaries in 4 bytes a pixel, where float64 took 24 (100 MB at the 4-MP decode limit).
        values = np.clip(np.asarray(image, dtype=np.int32), 0, 65535)
        values += 128
        values //= 257
        image = Image.fromarray(values.astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


class _DeadlineFile(io.BytesIO):
    """The upload as Pillow reads it: every read first checks the request's deadline.

    Pillow reads the file piece by piece: headers while opening, then at most `decodermaxblock`
    (64 KiB) per call into the decoder, so a decode stops at the first read after the deadline.
    What one read sets off cannot be interrupted: ~1 ms of work for 64 KiB of compressed data, and
    never more than the whole file's estimated cost, which `decodecost.MAX_DECODE_CPU_S` bounds
    (a WebP is read whole and decoded in one C call; a progressive JPEG's scans can sit in one read).
    """

    def __init__(self, data: bytes, name: str, deadline: float, clock: Callable[[], float]) -> None:
        super().__init__(data)
        self._name = name
        self._deadline = deadline
        self._clock = clock

    def read(self, size: int | None = -1, /) -> bytes:
        self.check_deadline()
        return super().read(size)

    def check_deadline(self) -> None:
        if self._clock() >= self._deadline:
            raise DeadlineExceededError(
                f"{self._name}: the request's deadline (CONVSERVE_REQUEST_TIMEOUT_S) passed while the image "
                "was being decoded, so decoding was stopped; the server is busy or the image is costly, "
                "retry later or send a smaller image"
            )


@dataclass(frozen=True)
class ImagePreprocessor:
    """One model's input from encoded image bytes: bounded decode, then the shared `EvalTransform`."""

    transform: EvalTransform
    use_draft: bool = True
    """Decode large JPEGs at reduced size (DCT scaling) while they stay `DRAFT_MARGIN` x the resize."""
    max_pixels: int = MAX_IMAGE_PIXELS
    max_decoded_pixels: int = MAX_DECODED_PIXELS
    clock: Callable[[], float] = time.monotonic
    """The clock request deadlines are read on (`time.monotonic`, as `Predictor.deadline` sets them)."""

    @classmethod
    def from_metadata(
        cls,
        metadata: ModelMetadata,
        use_draft: bool = True,
        max_pixels: int = MAX_IMAGE_PIXELS,
        max_decoded_pixels: int = MAX_DECODED_PIXELS,
    ) -> ImagePreprocessor:
        transform = EvalTransform.from_spec(metadata.eval_spec, metadata.input_dtype)
        return cls(transform, use_draft, max_pixels, max_decoded_pixels)

    def __call__(
        self, data: bytes, name: str = "image", out: np.ndarray | None = None, deadline: float = math.inf
    ) -> np.ndarray:
        """Decode and transform one image (into `out`, a [3, H, W] row of the transform's `input_dtype`:
        float32, or uint8 for a model that normalizes in its graph, when given).

        Blocking: call it from a worker thread. `deadline` is a `clock()` time: decoding stops with
        `DeadlineExceededError` at the first read of the file after it.
        """
        image, source_size = self._decode(data, name, deadline)
        return self.transform(image, out, source_size=source_size)

    def transform_into(
        self,
        data: bytes,
        name: str,
        out: np.ndarray,
        deadline: float = math.inf,
        helper: Executor | None = None,
    ) -> tuple[int, int]:
        """`self(data, name, out, deadline)`, returning the image's upright (width, height) as sent
        (a JPEG decoded at reduced size still reports its full size).

        `helper`: an executor that may have an idle thread (a lone image's): it resamples the lower band
        of the row (`EvalTransform.bands`) while this thread does the upper, so one image's resize takes
        two cores; the row is the same either way.
        """
        image, source_size = self._decode(data, name, deadline)
        if (
            helper is None
            or len(self.transform.bands) < 2
            or not self.transform.resamples(image, source_size)
        ):
            self.transform(image, out, source_size=source_size)
        else:
            self._in_bands(image, out, source_size, helper)
        return source_size or image.size

    def _in_bands(
        self, image: Image.Image, out: np.ndarray, source_size: tuple[int, int] | None, helper: Executor
    ) -> None:
        upper, lower = self.transform.bands
        job = helper.submit(self.transform, image, out, source_size=source_size, rows=lower)
        self.transform(image, out, source_size=source_size, rows=upper)
        # Never wait for a job no thread has taken (the helper may be this thread's own pool, with every
        # thread busy, or waiting like this one): take it back and do it here.
        if job.cancel():
            self.transform(image, out, source_size=source_size, rows=lower)
        else:
            job.result()

    def decode(self, data: bytes, name: str = "image", deadline: float = math.inf) -> Image.Image:
        """Bytes -> upright 8-bit RGB PIL image; `InvalidInputError` naming `name` if it cannot be."""
        return self._decode(data, name, deadline)[0]

    def _decode(self, data: bytes, name: str, deadline: float) -> tuple[Image.Image, tuple[int, int] | None]:
        """The upright RGB image, and the upright full size when it was decoded at reduced size."""
        if not data:
            raise InvalidInputError(
                f"{name}: the file is empty (0 bytes); send a JPEG, PNG, WebP, BMP or GIF"
            )
        plan = decodecost.inspect(data, name)  # before Pillow parses a byte of it
        source = _DeadlineFile(data, name, deadline, self.clock)
        image = self._open(source, len(data), name)
        full_size = image.size
        if self.use_draft and plan.reducible:
            # draft() picks the strongest 1/2, 1/4 or 1/8 reduction that keeps the shorter side >= target.
            target = math.ceil(DRAFT_MARGIN * max(self.transform.resize_size, *self.transform.input_size))
            image.draft("RGB", (target, target))
        self._check_decoded_size(image, plan, name)
        decodecost.check(plan.costs(image.size, image.mode), name, plan.kind)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidInputError(
                f"{name}: the {image.format} data is truncated or corrupt ({exc})"
            ) from exc
        source.check_deadline()  # the last read may come before the decoder's final output pass
        decoded_size = image.size
        image = to_rgb(self._upright(image, name))
        if decoded_size == full_size:
            return image, None
        turned = image.size != decoded_size  # EXIF orientation swapped the axes
        return image, (full_size[::-1] if turned else full_size)

    def _open(self, source: _DeadlineFile, length: int, name: str) -> Image.Image:
        try:
            image = Image.open(source, formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise InvalidInputError(f"{name}: {exc}; the limit is {self.max_pixels} pixels") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InvalidInputError(
                f"{name}: not a readable image ({length} bytes); expected one of "
                f"{', '.join(ACCEPTED_FORMATS)}"
            ) from exc
        width, height = image.size
        if width * height > self.max_pixels:
            raise InvalidInputError(
                f"{name}: declared size {width}x{height} ({width * height} pixels) is over the limit of "
                f"{self.max_pixels} pixels; downscale the image before sending it"
            )
        if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
            crop_height, crop_width = self.transform.input_size
            raise InvalidInputError(
                f"{name}: {width}x{height} has an aspect ratio beyond {MAX_ASPECT_RATIO:g}:1, which the "
                f"model's {crop_width}x{crop_height} center crop cannot use; crop the region of interest "
                "before sending it"
            )
        return image

    def _check_decoded_size(self, image: Image.Image, plan: decodecost.DecodePlan, name: str) -> None:
        width, height = image.size  # after draft(): the reduced size a JPEG will really be decoded at
        if width * height > self.max_decoded_pixels:
            lossless = plan.kind == "JPEG" and not plan.reducible  # DCT scaling does not apply to it
            fix = (
                "re-encode it as a baseline JPEG, which is decoded at reduced size"
                if lossless
                else "downscale it, or send a JPEG, which is decoded at reduced size"
            )
            raise InvalidInputError(
                f"{name}: decoding this {image.format} would produce {width}x{height} pixels, over the limit "
                f"of {self.max_decoded_pixels} (CONVSERVE_MAX_DECODED_PIXELS); {fix}"
            )

    @staticmethod
    def _upright(image: Image.Image, name: str) -> Image.Image:
        # ImageOps.exif_transpose reads the orientation the same way, but then re-encodes the whole
        # EXIF block (~10 µs a tag) and rewrites the XMP packet, neither of which the model uses.
        try:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        except (OSError, ValueError, SyntaxError, KeyError, TypeError) as exc:  # malformed EXIF blocks
            logger.debug("%s: ignoring unreadable EXIF orientation (%s)", name, exc)
            return image
        method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
        return image if method is None else image.transpose(method)
