"""The service's PIL + numpy preprocessing against the training eval transform, on real photos."""

from __future__ import annotations

import io
import logging
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from modelcontract import EvalSpec, ModelMetadata
from service.errors import InvalidInputError
from service.inference.preprocessing import ImagePreprocessor
from service.models.runtime import OnnxModel
from tests.photos import encode, jpeg, large_jpeg, photo
from tests.tinymodel import TINY_SPEC
from training.transforms import eval_transform

logger = logging.getLogger(__name__)

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
SPECS = {
    "tiny-bilinear": TINY_SPEC,
    "imagenet-bicubic": EvalSpec(input_size=(224, 224), resize_size=256, interpolation="bicubic", **IMAGENET),
    "nearest-half": EvalSpec(
        input_size=(64, 64), resize_size=64, interpolation="nearest", mean=(0.5,) * 3, std=(0.5,) * 3
    ),
    # Taller than the resized image: CenterCrop pads with zeros first.
    "padded-crop": EvalSpec(input_size=(40, 20), resize_size=20, interpolation="bilinear", **IMAGENET),
}


def preprocessor_for(spec: EvalSpec, use_draft: bool = False) -> ImagePreprocessor:
    # Through the metadata's JSON form, as the service gets it from a model file.
    props = ModelMetadata(labels=("a",), eval_spec=spec).to_props()
    return ImagePreprocessor.from_metadata(ModelMetadata.from_props(props, "test"), use_draft=use_draft)


def torchvision_reference(image: Image.Image, spec: EvalSpec) -> np.ndarray:
    """torchvision's Resize -> CenterCrop -> ToTensor -> Normalize, which the shared transform replaces."""
    interpolation = InterpolationMode(spec.interpolation)
    pipeline = transforms.Compose(
        [
            transforms.Resize(spec.resize_size, interpolation=interpolation, antialias=True),
            transforms.CenterCrop(spec.input_size),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    tensor = pipeline(image)
    assert isinstance(tensor, torch.Tensor)
    return tensor.numpy()


def grey_levels(difference: np.ndarray, spec: EvalSpec) -> np.ndarray:
    """A difference in normalized units, back in 8-bit grey levels per channel."""
    return np.abs(difference) * np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1) * 255.0


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("name", PHOTOS)
def test_shared_transform_is_torchvisions_within_rounding(name: str, spec_name: str) -> None:
    """Box resizing of the crop region moves a few pixels by one grey level; the table lookup is exact."""
    spec = SPECS[spec_name]
    image = photo(name)
    ours = preprocessor_for(spec).transform(image)
    reference = torchvision_reference(image, spec)
    assert ours.shape == reference.shape == (3, *spec.input_size)
    assert ours.dtype == np.float32
    levels = grey_levels(ours - reference, spec)
    assert float(levels.max()) <= 1.0 + 1e-3
    assert float((levels > 1e-3).mean()) <= 0.01


@pytest.mark.parametrize("name", PHOTOS)
def test_served_upload_is_exactly_the_training_eval_transform(name: str) -> None:
    """Parity by construction: the service and training evaluation run the same transform object."""
    spec = SPECS["imagenet-bicubic"]
    image = photo(name)
    served = preprocessor_for(spec)(encode(image, "PNG"), f"{name}.png")
    evaluated = eval_transform(spec)(image)
    assert isinstance(evaluated, torch.Tensor)
    np.testing.assert_array_equal(served, evaluated.numpy())


def test_transform_writes_into_a_preallocated_batch_row() -> None:
    preprocessor = preprocessor_for(TINY_SPEC)
    batch = np.zeros((2, 3, *TINY_SPEC.input_size), dtype=np.float32)
    returned = preprocessor(jpeg("coffee"), "coffee.jpg", out=batch[1])
    assert returned is batch[1] or np.shares_memory(returned, batch)
    np.testing.assert_array_equal(batch[1], preprocessor(jpeg("coffee"), "coffee.jpg"))
    assert not batch[0].any()


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("name", PHOTOS)
def test_bands_of_rows_written_apart_are_the_whole_row(name: str, spec_name: str) -> None:
    """Two threads may write a lone image's row band by band, in any order: the same row, bit for bit."""
    spec = SPECS[spec_name]
    transform = preprocessor_for(spec).transform
    image = photo(name)
    whole = transform(image)
    assert (
        len(transform.bands) == 2
        and transform.bands[0][0] == 0
        and transform.bands[-1][1] == spec.input_size[0]
    )
    banded = np.full_like(whole, np.nan)
    for band in reversed(transform.bands):
        transform(image, banded, rows=band)
    np.testing.assert_array_equal(banded, whole)
    np.testing.assert_array_equal(
        np.concatenate([transform.crop(image, rows=band) for band in transform.bands]), transform.crop(image)
    )
    with pytest.raises(ValueError, match="rows must be one of the bands"):
        transform(image, rows=(1, 3))


def test_a_lone_jpeg_resampled_in_halves_on_two_threads_is_the_same_row() -> None:
    """Decoded at reduced size (the resize laid out on the full picture) and resampled in two halves,
    the upper here and the lower on the helper's thread: the row of the decode on one thread."""
    preprocessor = preprocessor_for(SPECS["imagenet-bicubic"], use_draft=True)
    shape = (3, *SPECS["imagenet-bicubic"].input_size)
    for name in PHOTOS:
        data = large_jpeg(name, long_side=1500)
        assert preprocessor.transform.resamples(preprocessor.decode(data))  # the banded path applies
        alone, helped = np.empty(shape, np.float32), np.empty(shape, np.float32)
        size = preprocessor.transform_into(data, name, alone)
        with ThreadPoolExecutor(1) as helper:
            assert preprocessor.transform_into(data, name, helped, helper=helper) == size
        np.testing.assert_array_equal(helped, alone)


def test_a_half_no_helper_thread_takes_is_resampled_by_the_decoding_thread() -> None:
    """The helper's threads may all be busy (or waiting like this one, in the same pool): the lower
    half is taken back rather than waited for, so the decode finishes on its own thread."""
    preprocessor = preprocessor_for(SPECS["imagenet-bicubic"], use_draft=True)
    data = large_jpeg("astronaut", long_side=1500)
    alone, helped = (np.empty((3, 224, 224), np.float32) for _ in range(2))
    preprocessor.transform_into(data, "astronaut.jpg", alone)
    busy = threading.Event()
    with ThreadPoolExecutor(1) as helper:
        helper.submit(busy.wait, 60)  # the helper's only thread, taken until released
        try:
            preprocessor.transform_into(data, "astronaut.jpg", helped, helper=helper)
            assert not busy.is_set()  # returned while the helper was still busy
        finally:
            busy.set()
    np.testing.assert_array_equal(helped, alone)


def test_drafted_jpeg_uploads_stay_close_to_the_full_decode(tiny_model: OnnxModel) -> None:
    """DCT-scaled decoding of large JPEGs: mean difference <= 0.02 (normalized units), same top-1."""
    spec = SPECS["imagenet-bicubic"]
    exact, drafted = preprocessor_for(spec, use_draft=False), preprocessor_for(spec, use_draft=True)
    uploads = [large_jpeg(name, long_side) for name in PHOTOS for long_side in (900, 1600, 2000)]
    full_size = Image.open(io.BytesIO(uploads[-1])).size
    assert drafted.decode(uploads[-1]).size < full_size, "draft mode did not reduce the decode size"
    differences = [float(np.abs(exact(data) - drafted(data)).mean()) for data in uploads]
    logger.warning(
        "draft vs full decode, %d JPEGs of 0.4-4 MP: mean abs diff per image %s (normalized units)",
        len(uploads),
        " ".join(f"{d:.4f}" for d in differences),
    )
    assert max(differences) <= 0.02
    assert max(differences) > 0  # draft mode really took another path
    tiny = preprocessor_for(TINY_SPEC, use_draft=False), preprocessor_for(TINY_SPEC, use_draft=True)
    exact_top1 = tiny_model.run(np.stack([tiny[0](data) for data in uploads])).argmax(axis=1)
    drafted_top1 = tiny_model.run(np.stack([tiny[1](data) for data in uploads])).argmax(axis=1)
    np.testing.assert_array_equal(exact_top1, drafted_top1)


def test_a_sideways_drafted_jpeg_is_laid_out_on_its_upright_full_size() -> None:
    """EXIF rotation after a reduced decode: the crop is placed on the rotated full picture."""
    spec = SPECS["imagenet-bicubic"]
    upright = Image.open(io.BytesIO(large_jpeg("rocket", 2000))).convert("RGB")  # landscape 2000x1335
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: rotate 90 degrees clockwise to display
    sideways = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    drafted = preprocessor_for(spec, use_draft=True)
    assert drafted.decode(sideways).size < upright.size, "draft mode did not reduce the decode size"
    difference = np.abs(drafted(sideways) - torchvision_reference(upright, spec)).mean()
    assert float(difference) <= 0.02


def test_small_jpegs_are_decoded_at_full_size_even_with_draft() -> None:
    data = jpeg("chelsea")  # 451x300 against a 1.5 x 256 target: no 2x reduction possible
    assert preprocessor_for(SPECS["imagenet-bicubic"], use_draft=True).decode(data).size == (451, 300)


def test_exif_orientation_is_applied() -> None:
    upright = photo("chelsea")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a sideways camera writes
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    decoded = preprocessor_for(TINY_SPEC).decode(encode(stored, "PNG", exif=exif.tobytes()))
    assert decoded.size == upright.size
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(upright))


def test_grayscale_image_becomes_three_equal_channels() -> None:
    gray = photo("coffee").convert("L")
    decoded = np.asarray(preprocessor_for(TINY_SPEC).decode(encode(gray, "PNG")))
    assert decoded.shape[2] == 3
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], np.asarray(gray))


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits() -> None:
    gray = np.asarray(photo("coffee").convert("L"))
    deep = Image.fromarray((gray.astype(np.uint16) * 257).astype(np.uint16))
    assert deep.mode.startswith("I")
    decoded = np.asarray(preprocessor_for(TINY_SPEC).decode(encode(deep, "PNG")))
    np.testing.assert_array_equal(decoded[:, :, 0], gray)


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_alpha_and_palette_images_become_rgb(mode: str) -> None:
    source = photo("astronaut").convert(mode)
    decoded = preprocessor_for(TINY_SPEC).decode(encode(source, "PNG"))
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(source.convert("RGB")))


def test_cmyk_jpeg_becomes_rgb() -> None:
    decoded = preprocessor_for(TINY_SPEC).decode(encode(photo("coffee").convert("CMYK"), "JPEG"))
    assert decoded.mode == "RGB" and decoded.size == photo("coffee").size


@pytest.mark.parametrize("fmt", ["WEBP", "BMP"])
def test_lossless_formats_decode_to_the_original_pixels(fmt: str) -> None:
    original = photo("chelsea")
    options = {"lossless": True} if fmt == "WEBP" else {}
    decoded = preprocessor_for(TINY_SPEC).decode(encode(original, fmt, **options))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(original))


def test_animated_gif_uses_its_first_frame() -> None:
    red, blue = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue])
    decoded = np.asarray(preprocessor_for(TINY_SPEC).decode(data))
    assert tuple(decoded[20, 20]) == (255, 0, 0)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a few bytes: a bomb's shape."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("width", "height"), [(8000, 8000), (40000, 40000)])
def test_decompression_bomb_is_refused_before_decoding(width: int, height: int) -> None:
    with pytest.raises(InvalidInputError, match="limit"):
        preprocessor_for(TINY_SPEC).decode(png_declaring(width, height), "bomb.png")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, I am not an image", "not a readable image"),
        (jpeg("chelsea")[:2000], "truncated or corrupt"),
    ],
    ids=["zero-bytes", "text", "truncated-jpeg"],
)
def test_unusable_files_are_refused_with_a_message_naming_the_file(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as refused:
        preprocessor_for(TINY_SPEC)(data, "upload.jpg")
    assert refused.value.message.startswith("upload.jpg:")
    assert refused.value.status_code == 422
