"""The malformed-file corpus: what hostile or careless clients upload, and what the service must answer.

Each `HostileCase` is one `POST /predict` request: its multipart files and the HTTP status the
service gives with default settings (as hardened to be safe to expose). 200 for every image a
reasonable user could send; 422 for anything that is not a decodable image in an accepted format
(JPEG, PNG, WebP, BMP, GIF), for headers declaring more than the pixel limit, for aspect ratios
beyond `MAX_ASPECT_RATIO_EXPECTED`, and for files whose decode would cost more than the budget of
`service.inference.decodecost` (`decode_cost_cases`: scans, coefficients, metadata, chunks, run-length
codes); 400 for bodies the multipart parser cannot read (a part header line over
python-multipart's 4 KiB limit).

Send `case.multipart()` as the raw body: an HTTP client's own multipart encoder (httpx, aiohttp)
percent-escapes CR, LF and NUL in file names, so the hostile names would never reach the server.

The corpus is deterministic, built in memory in well under two seconds, and needs no torch.
`python -m benchmarks --robustness` sends every case to a real server and measures what each costs
against `reference_jpeg()`, a normal 2-megapixel photo.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common.corpus import encode_jpeg, resize_to_megapixels
from benchmarks.robustness import crafted_files as crafted

MAX_ASPECT_RATIO_EXPECTED = 20
"""Longer:shorter side ratio beyond which the service refuses an image (422)."""
MAX_PIXELS_EXPECTED = 40_000_000
"""The service's default limit on the area an image declares (CONVSERVE_MAX_IMAGE_PIXELS)."""
MAX_DECODED_PIXELS_EXPECTED = 4_194_304
"""The service's default limit on the area really decoded, after JPEG DCT scaling (2048²)."""
HUNDRED_FILES = 100

JPEG, PNG, GIF, WEBP, BMP = "image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp"
File = tuple[str, bytes, str]
"""(filename, bytes, content type) of one multipart file part."""


@dataclass(frozen=True)
class HostileCase:
    name: str
    files: tuple[File, ...]
    expected_status: int
    description: str

    def multipart(self) -> tuple[bytes, str]:
        """(body, Content-Type) of the request, with the file names exactly as given."""
        return crafted.encode_multipart(self.files)

    @property
    def upload_bytes(self) -> int:
        return sum(len(data) for _, data, _ in self.files)


@functools.cache
def _cat() -> Image.Image:
    """scikit-image's cat photo (451×300), read straight from the PNG the package ships.

    `skimage.data.chelsea()` returns the same pixels but spends most of a second importing its
    readers; Pillow reads the file in milliseconds.
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("scikit-image is needed for its sample photos: pip install scikit-image")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "chelsea.png"
    with Image.open(path) as image:
        return image.convert("RGB")


@functools.cache
def reference_jpeg() -> bytes:
    """A normal 2-megapixel photo (the cat upscaled, quality 90, as in the benchmark corpus)."""
    return encode_jpeg(resize_to_megapixels(_cat(), 2.0))


@functools.cache
def small_jpeg() -> bytes:
    """The 451×300 cat as a quality-85 JPEG (~25 KB): the carrier for file-name and many-file cases."""
    return encode_jpeg(_cat(), quality=85)


def _exif(**tags: object) -> bytes:
    exif = Image.Exif()
    for tag, value in tags.items():
        exif[{"orientation": 0x0112, "description": 0x010E}[tag]] = value
    return exif.tobytes()


def _one(name: str, data: bytes, content_type: str, status: int, description: str) -> HostileCase:
    subtype = content_type.rpartition("/")[2]
    extension = {"svg+xml": "svg", "octet-stream": "bin", "plain": "txt"}.get(subtype, subtype)
    return HostileCase(name, ((f"{name}.{extension}", data, content_type),), status, description)


def _not_images() -> list[HostileCase]:
    rng = np.random.default_rng(8)
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="224" height="224"><circle r="50"/></svg>\n'
    html = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>\n"
    pdf = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\ntrailer\n%%EOF\n"
    gif_header_only = b"GIF89a" + bytes([0x40, 0x01, 0xF0, 0x00, 0xF7, 0x00, 0x00])
    heic = crafted.iso_media_header(b"heic", [b"mif1", b"heic"])
    avif = crafted.iso_media_header(b"avif", [b"avif", b"mif1", b"miaf"])
    return [
        _one("empty_file", b"", JPEG, 422, "zero bytes"),
        _one("random_bytes", rng.bytes(64 * 1024), "application/octet-stream", 422, "64 KiB of noise"),
        _one("plain_text", b"this is not an image\n" * 50, JPEG, 422, "text sent as image/jpeg"),
        _one("html", html, "text/html", 422, "an HTML page"),
        _one("svg", svg, "image/svg+xml", 422, "vector image, not an accepted format"),
        _one("pdf_header", pdf, "application/pdf", 422, "a PDF"),
        _one("heic_header", heic, "image/heic", 422, "ISO-BMFF ftyp heic header (iPhone photo format)"),
        _one("avif_header", avif, "image/avif", 422, "ISO-BMFF ftyp avif header"),
        _one("gif_header_only", gif_header_only, "image/gif", 422, "GIF signature and screen, no data"),
    ]


def _broken_images() -> list[HostileCase]:
    reference = reference_jpeg()
    small_png = crafted.encode_image(_cat(), "PNG")
    tiff = crafted.encode_image(_cat(), "TIFF", save_all=True, append_images=[_cat().rotate(90)])
    corrupt_exif = crafted.jpeg_with_app1(small_jpeg(), b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + bytes(32))
    return [
        _one("truncated_jpeg", reference[: len(reference) // 2], JPEG, 422, "2-MP JPEG cut in half"),
        _one("png_corrupt_data", crafted.corrupt_png_data(small_png), PNG, 422, "IDAT bytes overwritten"),
        _one("tiff_two_frames", tiff, "image/tiff", 422, "TIFF is not an accepted format"),
        # Pillow warns "Corrupt EXIF data" (UserWarning) when it reads this one's EXIF.
        _one("jpeg_corrupt_exif", corrupt_exif, JPEG, 200, "valid JPEG, EXIF IFD offset out of range"),
    ]


def _declared_sizes() -> list[HostileCase]:
    limit = MAX_ASPECT_RATIO_EXPECTED
    return [
        _one("png_declares_100000x100000", crafted.png_declaring(100_000, 100_000), PNG, 422, "IHDR lies"),
        _one(
            "jpeg_declares_65000x65000",
            crafted.jpeg_declaring(small_jpeg(), 65_000, 65_000),
            JPEG,
            422,
            "SOF0 frame header patched",
        ),
        _one("png_4000x1", crafted.black_png(4000, 1), PNG, 422, f"aspect 4000:1 > {limit}:1"),
        _one("png_1x4000", crafted.black_png(1, 4000), PNG, 422, f"aspect 4000:1 > {limit}:1"),
        _one("png_40000x1", crafted.black_png(40_000, 1), PNG, 422, f"aspect 40000:1 > {limit}:1"),
        _one(
            "png_1x39000000",
            crafted.black_png(1, 39_000_000, mode="L"),
            PNG,
            422,
            f"39 MP under the pixel limit, in ~80 KB; aspect > {limit}:1",
        ),
    ]


def _unusual_images() -> list[HostileCase]:
    cat = _cat()
    gray16 = (np.asarray(cat.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    # Fast octree quantising: the adaptive palette would cost a quarter second per image here.
    palette = cat.quantize(64, method=Image.Quantize.FASTOCTREE)
    palette.info["transparency"] = 0
    frames = [cat.quantize(128, method=Image.Quantize.FASTOCTREE), cat.rotate(180).convert("P")]
    huge_exif = "x" * 60_000
    return [
        _one("reference_jpeg_2mp", reference_jpeg(), JPEG, 200, "a normal 2-MP photo"),
        _one("cmyk_jpeg", crafted.encode_image(cat.convert("CMYK"), "JPEG", quality=85), JPEG, 200, "CMYK"),
        _one("png_16bit", crafted.encode_image(Image.fromarray(gray16), "PNG"), PNG, 200, "16-bit gray"),
        _one("png_1bit", crafted.encode_image(cat.convert("1"), "PNG"), PNG, 200, "1-bit black and white"),
        _one("png_palette_alpha", crafted.encode_image(palette, "PNG"), PNG, 200, "palette + transparency"),
        _one(
            "gif_animated",
            crafted.encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
            "image/gif",
            200,
            "two frames; the first is classified",
        ),
        _one(
            "png_1x1", crafted.encode_image(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), PNG, 200, "1×1"
        ),
        _one("webp", crafted.encode_image(cat, "WEBP", quality=80), "image/webp", 200, "WebP photo"),
        _one("bmp", crafted.encode_image(cat, "BMP"), "image/bmp", 200, "BMP photo"),
        _one(
            "jpeg_huge_exif",
            crafted.encode_image(cat, "JPEG", quality=85, exif=_exif(description=huge_exif)),
            JPEG,
            200,
            "60 KB EXIF ImageDescription",
        ),
        _one(
            "jpeg_exif_rotated",
            crafted.encode_image(cat, "JPEG", quality=85, exif=_exif(orientation=6)),
            JPEG,
            200,
            "EXIF orientation 6: stored sideways, shown upright",
        ),
    ]


def _request_shapes() -> list[HostileCase]:
    carrier = small_jpeg()

    def named(name: str, filename: str, status: int, description: str) -> HostileCase:
        return HostileCase(name, ((filename, carrier, JPEG),), status, description)

    many = tuple((f"cat_{index:03d}.jpg", carrier, JPEG) for index in range(HUNDRED_FILES))
    return [
        HostileCase("hundred_files", many, 200, f"{HUNDRED_FILES} small JPEGs in one request"),
        named("filename_path_traversal", "../../etc/passwd", 200, "path traversal in the name"),
        named("filename_lf", "cat.jpg\nINFO forged log line", 200, "raw LF: log injection"),
        named("filename_nul", "cat\x00.jpg", 200, "raw NUL byte"),
        named("filename_rtl_override", "cat\u202egpj.exe", 200, "Unicode right-to-left override"),
        named("filename_4000_chars", "a" * 3996 + ".jpg", 200, "long, within the part-header limit"),
        # python-multipart refuses part header lines over 4 KiB: a malformed body, hence 400.
        named("filename_10000_chars", "a" * 9996 + ".jpg", 400, "part header over 4 KiB"),
        # A raw CR LF ends the header line inside the quoted name: the rest parses as a header of its
        # own (header injection), the name arrives as `"cat.jpg`, and the image itself is still read.
        named("filename_crlf", "cat.jpg\r\nX-Injected: 1", 200, "raw CR LF: injects a part header"),
    ]


def decode_cost_cases() -> list[HostileCase]:
    """Legal-looking files whose decode costs far more than their pixel count says, one per family.

    Each is refused (422) before the costly work, except where the cost now fits the budget; the
    description gives what the file cost to decode here before `service.inference.decodecost` existed.
    """
    mib = 1 << 20
    tiny_progressive = crafted.jpeg_scan_bomb(64, 64, 2)
    exif_segment = crafted.jpeg_segment(0xE1, b"Exif\x00\x00" + bytes(65_000))
    return [
        _one(
            "jpeg_progressive_200_scans",
            crafted.jpeg_scan_bomb(4000, 3000, 200),
            JPEG,
            422,
            "12 MP, 200 refinement scans in 7 KB: 1.4 s",
        ),
        _one(
            "jpeg_progressive_1000_scans",
            crafted.jpeg_scan_bomb(4000, 3000, 1000),
            JPEG,
            422,
            "12 MP, 1000 scans in 33 KB: 7 s",
        ),
        _one(
            "jpeg_progressive_40mp_444",
            crafted.jpeg_scan_bomb(8000, 5000, 30, components=3),
            JPEG,
            422,
            "all DCT coefficients of 40 MP 4:4:4 in 3 KB: 0.9 s, 232 MiB",
        ),
        _one(
            "jpeg_sequential_multiscan_40mp",
            crafted.jpeg_scan_bomb(
                8000, 5000, 100, components=3, marker=crafted.SOF_BASELINE, with_data=False
            ),
            JPEG,
            422,
            "baseline, one component per scan, 100 empty scans: 0.45 s, 232 MiB",
        ),
        _one(
            "jpeg_arithmetic_200_scans",
            crafted.jpeg_scan_bomb(4000, 3000, 200, marker=crafted.SOF_ARITHMETIC_PROGRESSIVE),
            JPEG,
            422,
            "arithmetic-coded progressive, 200 empty scans in 2 KB: 1.8 s",
        ),
        _one(
            "jpeg_dense_40mp_cmyk",
            crafted.dense_jpeg(8000, 5000, 4),
            JPEG,
            422,
            "baseline, every coefficient coded, 40 MB: 0.65 s",
        ),
        _one(
            "jpeg_lossless_40mp",
            crafted.lossless_jpeg(8000, 5000),
            JPEG,
            422,
            "lossless (SOF3): no reduced decoding",
        ),
        _one("jpeg_lossless_512", crafted.lossless_jpeg(512, 512), JPEG, 200, "small lossless JPEG: decoded"),
        _one("jpeg_12bit", crafted.lossless_jpeg(64, 64, precision=12), JPEG, 422, "12-bit samples"),
        _one(
            "jpeg_header_fill_1mb",
            crafted.jpeg_with_segments(tiny_progressive, b"\xff" * mib, 1),
            JPEG,
            422,
            "1 MiB of 0xFF before the frame, walked a byte at a time: 0.24 s",
        ),
        _one(
            "jpeg_exif_80_segments",
            crafted.jpeg_with_segments(tiny_progressive, exif_segment, 80),
            JPEG,
            422,
            "80 Exif APP1 segments (5 MB), concatenated one by one",
        ),
        _one(
            "jpeg_fill_run_13mb",
            crafted.jpeg_with_fill_run(tiny_progressive, 13_000_000),
            JPEG,
            422,
            "13 MB of 0xFF fill between scans, re-read per 64 KiB: 0.95 s",
        ),
        _one(
            "png_text_bomb",
            crafted.png_text_bomb(63, mib - 1),
            PNG,
            422,
            "63 compressed iTXt chunks in 67 KB: 0.23 s, 260 MiB",
        ),
        _one(
            "png_100k_chunks",
            crafted.png_with_chunks(crafted.black_png(64, 64), crafted.png_chunk(b"zzZz", b"") * 100_000),
            PNG,
            422,
            "100,000 empty private chunks: 0.22 s",
        ),
        _one(
            "png_exif_65000_tags",
            crafted.png_with_chunks(
                crafted.black_png(64, 64), crafted.png_chunk(b"eXIf", crafted.exif_block(65_000)[6:])
            ),
            PNG,
            422,
            "65,000 EXIF tags (780 KB), rotated: 1.5 s, then 0.11 s of Python holding the GIL; over 64 KiB",
        ),
        _one(
            "png_exif_5000_tags",
            crafted.png_with_chunks(
                crafted.black_png(64, 64), crafted.png_chunk(b"eXIf", crafted.exif_block(5_000)[6:])
            ),
            PNG,
            200,
            "5,000 EXIF tags (60 KB, under the 64 KiB a JPEG segment can hold), rotated: ~9 ms",
        ),
        _one(
            "png_gray16_2048",
            crafted.png_rows(2048, 2048, 16, 0),
            PNG,
            200,
            "16-bit gray at the decode limit: 123 MiB before the integer conversion",
        ),
        _one(
            "gif_lzw_clear_codes_20mb",
            crafted.gif_with_lzw(64, 64, crafted.lzw_clear_codes(20_000_000)),
            GIF,
            422,
            "20 MB of LZW clear codes over a 64x64 frame: was ~0.1 s, then truncated; refused from the walk",
        ),
        _one(
            "gif_comment_10mb",
            crafted.gif_with_lzw(64, 64, crafted.lzw_clear_codes(3), crafted.gif_comment(10 * mib)),
            GIF,
            422,
            "10 MiB comment in 41,000 sub-blocks",
        ),
        _one(
            "webp_300k_frames", crafted.webp_animation(300_000), WEBP, 422, "300,000 animation frames: 57 MiB"
        ),
        _one(
            "bmp_rle8_2mb_of_deltas",
            crafted.bmp_rle(2048, 2048, b"\x00\x02\x00\x00" * 500_000),
            BMP,
            422,
            "RLE8 codes that draw nothing, decoded in Python: 0.34 s",
        ),
    ]


_GROUPS: tuple[Callable[[], list[HostileCase]], ...] = (
    _not_images,
    _broken_images,
    _declared_sizes,
    _unusual_images,
    _request_shapes,
    decode_cost_cases,
)


@functools.cache
def _all_cases() -> tuple[HostileCase, ...]:
    cases = tuple(case for group in _GROUPS for case in group())
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise AssertionError(f"duplicate hostile case names: {sorted(names)}")
    return cases


def hostile_cases() -> list[HostileCase]:
    """Every case, in a fixed order (cheap refusals first, the reference among the accepted ones)."""
    return list(_all_cases())


def case_named(name: str) -> HostileCase:
    for case in _all_cases():
        if case.name == name:
            return case
    raise KeyError(f"no hostile case named {name!r}; known: {[case.name for case in _all_cases()]}")


def cost_probes() -> list[HostileCase]:
    """Legal-looking files that are cheap to send and costly to decode, sent for their cost.

    Not in `hostile_cases()`: their status follows limits the service may tune (the pixel area it
    will really decode, CONVSERVE_MAX_DECODED_PIXELS); `expected_status` is what the defaults give.
    """
    flat = Image.new("RGB", (8000, 5000), (90, 120, 60))
    side = math.isqrt(MAX_DECODED_PIXELS_EXPECTED)
    return [
        _one(
            f"png_{side}x{side}_rgba16_paeth",
            crafted.png_rows(side, side, 16, 6),
            PNG,
            200,
            "the costliest PNG rows at the decode limit: 33 MB, ~0.27 s",
        ),
        _one("png_6000x6000_black", crafted.black_png(6000, 6000), PNG, 422, "36 MP in ~110 KB"),
        _one(
            f"png_{side}x{side}_black", crafted.black_png(side, side), PNG, 200, "the most a PNG may decode"
        ),
        _one("jpeg_8000x5000_flat", encode_jpeg(flat, quality=75), JPEG, 200, "40 MP, decoded at 1/8 scale"),
    ]
