"""The hostile-file corpus: every case is what it claims to be, byte for byte, and parses as sent."""

from __future__ import annotations

import asyncio
import hashlib
import io
import struct
import subprocess
import sys
import zlib
from collections.abc import AsyncGenerator

import pytest
from PIL import Image

from benchmarks.robustness import crafted_files
from benchmarks.robustness.hostile_inputs import (
    HUNDRED_FILES,
    MAX_ASPECT_RATIO_EXPECTED,
    MAX_PIXELS_EXPECTED,
    HostileCase,
    case_named,
    cost_probes,
    decode_cost_cases,
    hostile_cases,
    reference_jpeg,
)
from service.errors import BadRequestError
from service.transport.multipart import read_files

ACCEPTED = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=ACCEPTED)


def _ihdr_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == crafted_files.PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", png[8:16])
    data, crc = png[16 : 16 + length], png[16 + length : 20 + length]
    assert kind == b"IHDR"
    assert struct.unpack(">I", crc)[0] == zlib.crc32(kind + data), "IHDR CRC must be valid"
    width, height = struct.unpack(">II", data[:8])
    return width, height


def _filenames(case: HostileCase) -> list[str]:
    """File names as the service's multipart reader reads them."""
    body, content_type = case.multipart()

    async def parse() -> list[str]:
        async def stream() -> AsyncGenerator[bytes, None]:
            yield body

        files = await read_files(stream(), content_type, max_files=256, max_fields=64)
        return [part.filename for part in files]

    return asyncio.run(parse())


def test_corpus_has_unique_named_cases_of_every_kind() -> None:
    cases = hostile_cases()
    names = [case.name for case in cases]
    assert len(cases) >= 25
    assert len(set(names)) == len(names)
    assert {case.expected_status for case in cases} == {200, 400, 422}
    assert all(case.files and all(isinstance(data, bytes) for _, data, _ in case.files) for case in cases)


def _digest() -> str:
    digest = hashlib.sha256()
    for case in [*hostile_cases(), *cost_probes()]:
        digest.update(case.name.encode() + case.multipart()[0])
    return digest.hexdigest()


def test_corpus_is_the_same_bytes_in_another_process() -> None:
    script = "from tests.benchmarks.test_bench_hostile_inputs import _digest; print(_digest())"
    other = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert other.stdout.strip() == _digest()


# jpeg_corrupt_exif is meant to carry a broken EXIF block, which Pillow reports with this warning.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_every_image_expected_to_pass_decodes_in_an_accepted_format() -> None:
    for case in hostile_cases():
        if case.expected_status != 200:
            continue
        for _, data, _ in case.files:
            with _open(data) as image:
                image.load()
                assert image.width * image.height <= MAX_PIXELS_EXPECTED, case.name
                ratio = max(image.size) / min(image.size)
                assert ratio <= MAX_ASPECT_RATIO_EXPECTED, case.name


def test_files_expected_to_fail_are_not_loadable_images_in_an_accepted_format() -> None:
    over_budget = {case.name for case in decode_cost_cases()}  # loadable, at a cost
    undecodable = [
        c
        for c in hostile_cases()
        if c.expected_status == 422 and not c.name.startswith(("png_", "jpeg_")) and c.name not in over_budget
    ]
    assert len(undecodable) >= 10
    for case in undecodable:
        ((_, data, _),) = case.files
        with pytest.raises((OSError, SyntaxError, ValueError)), _open(data) as image:
            image.load()


def test_unusual_but_valid_images_are_the_modes_they_claim() -> None:
    expected_modes = {"cmyk_jpeg": "CMYK", "png_16bit": "I;16", "png_1bit": "1", "png_palette_alpha": "P"}
    for name, mode in expected_modes.items():
        with _open(case_named(name).files[0][1]) as image:
            assert image.mode == mode, name
    with _open(case_named("png_palette_alpha").files[0][1]) as image:
        assert "transparency" in image.info
    with _open(case_named("gif_animated").files[0][1]) as image:
        assert getattr(image, "n_frames", 1) == 2
    with Image.open(io.BytesIO(case_named("tiff_two_frames").files[0][1])) as image:
        assert image.format == "TIFF" and getattr(image, "n_frames", 1) == 2
    with _open(case_named("jpeg_exif_rotated").files[0][1]) as image:
        assert image.getexif()[0x0112] == 6
    with _open(case_named("jpeg_huge_exif").files[0][1]) as image:
        assert len(image.info["exif"]) > 60_000


def test_reference_is_a_two_megapixel_photo_jpeg() -> None:
    with _open(reference_jpeg()) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        assert 1.9e6 <= image.width * image.height <= 2.1e6


def test_declared_sizes_are_in_the_headers() -> None:
    assert _ihdr_size(case_named("png_declares_100000x100000").files[0][1]) == (100_000, 100_000)
    for name, size in (("png_4000x1", (4000, 1)), ("png_1x4000", (1, 4000)), ("png_40000x1", (40_000, 1))):
        assert _ihdr_size(case_named(name).files[0][1]) == size
    tall = case_named("png_1x39000000").files[0][1]
    assert _ihdr_size(tall) == (1, 39_000_000)
    assert len(tall) < 100_000
    Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(case_named("jpeg_declares_65000x65000").files[0][1])) as image:
            assert image.size == (65_000, 65_000)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_aspect_ratio_cases_exceed_the_limit_and_expect_422() -> None:
    for name in ("png_4000x1", "png_1x4000", "png_40000x1", "png_1x39000000"):
        width, height = _ihdr_size(case_named(name).files[0][1])
        assert max(width, height) / min(width, height) > MAX_ASPECT_RATIO_EXPECTED
        assert case_named(name).expected_status == 422


def test_tall_png_really_holds_39_million_rows() -> None:
    with _open(case_named("png_1x39000000").files[0][1]) as image:
        image.load()
        assert image.size == (1, 39_000_000)
        assert image.getextrema() == (0, 0)


@pytest.mark.parametrize("length", [0, 5, (1 << 20) * 3 + 12345])
def test_zlib_of_zeros_is_a_valid_stream_of_that_many_zeros(length: int) -> None:
    assert zlib.decompress(crafted_files.zlib_of_zeros(length)) == bytes(length)


def test_iso_media_headers_carry_their_brand() -> None:
    for name, brand in (("heic_header", b"heic"), ("avif_header", b"avif")):
        data = case_named(name).files[0][1]
        assert data[4:8] == b"ftyp" and data[8:12] == brand


def test_hostile_file_names_reach_the_multipart_parser_raw() -> None:
    for name in ("filename_path_traversal", "filename_lf", "filename_nul", "filename_rtl_override"):
        case = case_named(name)
        assert _filenames(case) == [case.files[0][0]], name
    assert _filenames(case_named("filename_4000_chars")) == [case_named("filename_4000_chars").files[0][0]]
    # A raw CR LF cuts the quoted name short; the rest becomes a part header line of its own.
    assert _filenames(case_named("filename_crlf")) == ['"cat.jpg']
    with pytest.raises(BadRequestError, match="header size"):
        _filenames(case_named("filename_10000_chars"))


def test_hundred_files_arrive_as_hundred_parts() -> None:
    case = case_named("hundred_files")
    assert len(case.files) == HUNDRED_FILES
    assert len(_filenames(case)) == HUNDRED_FILES


def _jpeg_frame_marker(jpeg: bytes) -> int:
    return next(marker for marker, _ in crafted_files._jpeg_segments(jpeg) if 0xC0 <= marker <= 0xCF)


def test_jpeg_scan_bombs_hold_the_scans_and_frames_they_claim() -> None:
    expected = {
        "jpeg_progressive_200_scans": (0xC2, 200, (4000, 3000)),
        "jpeg_progressive_1000_scans": (0xC2, 1000, (4000, 3000)),
        "jpeg_progressive_40mp_444": (0xC2, 30, (8000, 5000)),
        "jpeg_sequential_multiscan_40mp": (0xC0, 100, (8000, 5000)),
        "jpeg_arithmetic_200_scans": (0xCA, 200, (4000, 3000)),
        "jpeg_lossless_40mp": (0xC3, 1, (8000, 5000)),
    }
    for name, (marker, scans, size) in expected.items():
        data = case_named(name).files[0][1]
        assert _jpeg_frame_marker(data) == marker, name
        assert data.count(b"\xff\xda") == scans, name
        assert len(data) < 20_000_000, name
        with _open(data) as image:
            assert image.size == size, name
    with _open(case_named("jpeg_progressive_40mp_444").files[0][1]) as image:
        assert image.mode == "RGB" and image.info.get("progressive") == 1
    assert (
        case_named("jpeg_12bit").files[0][1][
            crafted_files._jpeg_segments(case_named("jpeg_12bit").files[0][1])[0][1] + 4
        ]
        == 12
    )


def test_small_lossless_jpeg_decodes_to_its_zero_differences() -> None:
    with _open(case_named("jpeg_lossless_512").files[0][1]) as image:
        image.load()
        assert image.size == (512, 512) and image.getextrema() == (128, 128)  # predictor 1 starts at 2**7


@pytest.mark.parametrize(
    ("bits", "repeat"), [("00", 1001), ("0" + "01" * 63, 37), ("0" * 15, 3), ("101", 11)]
)
def test_entropy_coded_repeats_bits_with_ff_stuffing(bits: str, repeat: int) -> None:
    stream = bits * repeat
    stream += "1" * (-len(stream) % 8)
    naive = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")
    assert crafted_files.entropy_coded(bits, repeat) == naive


def test_png_cost_files_hold_the_chunks_they_claim() -> None:
    bomb = case_named("png_text_bomb").files[0][1]
    assert bomb.count(b"iTXt") == 63 and len(bomb) < 100_000
    start = bomb.index(b"iTXt") + 4
    (length,) = struct.unpack(">I", bomb[start - 8 : start - 4])
    text = zlib.decompress(bomb[start:].split(b"\x00", 4)[4][: length - 7])
    assert len(text) == (1 << 20) - 1 and text.decode().startswith("\U0001f600")
    assert case_named("png_100k_chunks").files[0][1].count(b"zzZz") == 100_000
    with _open(case_named("png_exif_65000_tags").files[0][1]) as image:
        exif = image.getexif()
        assert len(exif) == 65_000 and exif[0x0112] == 6
    with _open(case_named("png_gray16_2048").files[0][1]) as image:
        assert image.mode == "I;16" and image.size == (2048, 2048)


def test_gif_webp_bmp_cost_files_are_what_they_claim() -> None:
    clear = case_named("gif_lzw_clear_codes_20mb").files[0][1]
    assert len(clear) > 20_000_000
    with _open(case_named("gif_comment_10mb").files[0][1]) as image:
        assert len(image.info["comment"]) == 10 << 20
    with _open(case_named("webp_300k_frames").files[0][1]) as image:
        assert image.format == "WEBP" and getattr(image, "n_frames", 1) == 300_000
    with _open(case_named("bmp_rle8_2mb_of_deltas").files[0][1]) as image:
        assert image.format == "BMP" and image.info["compression"] == 1
