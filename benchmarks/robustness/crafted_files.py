"""Byte-level builders for malformed and extreme image files, and a raw multipart/form-data encoder.

Pillow can write ordinary images, but not the lies a hostile client tells: a PNG header that declares
100000×100000 pixels over a few bytes of data, a JPEG frame header patched to 65000×65000, a
one-pixel-wide PNG 39 million rows tall that compresses to ~80 KB. These are written here chunk by
chunk, with valid checksums, so the file gets past format sniffing and exercises the decoder itself.

The second half builds the files whose decode costs more than their pixel count says (see
`service.inference.decodecost`): JPEGs written marker by marker with their own Huffman tables and scan scripts
(hundreds of scans, lossless, arithmetic, 12-bit, fill bytes), PNGs with compressed-text bombs and
thousands of chunks, GIFs of clear codes, animated WebPs of many frames, run-length BMPs.
Everything is deterministic and built in memory.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {"L": 0, "RGB": 2}
_PNG_CHANNELS = {"L": 1, "RGB": 3}
_ZERO_BLOCK = bytes(1 << 20)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC-32 over type and data (as decoders check it)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_ihdr(width: int, height: int, mode: str = "RGB") -> bytes:
    """An IHDR chunk for 8-bit grayscale (`L`) or RGB, no interlace."""
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPES[mode], 0, 0, 0))


def zlib_of_zeros(length: int) -> bytes:
    """A zlib stream of `length` zero bytes, built without compressing them all.

    After a full flush deflate forgets its history, so every further megabyte of zeros compresses to
    the same bytes: compress one block, repeat it, and finish with the Adler-32 of the whole input.
    Compressing 100 MB outright takes most of a second; this takes milliseconds.
    """
    blocks, remainder = divmod(length, len(_ZERO_BLOCK))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(_ZERO_BLOCK) + deflate.flush(zlib.Z_FULL_FLUSH) if blocks else b""
    tail = deflate.compress(bytes(remainder)) + deflate.flush(zlib.Z_FINISH)
    checksum = 1
    for _ in range(blocks):
        checksum = zlib.adler32(_ZERO_BLOCK, checksum)
    checksum = zlib.adler32(bytes(remainder), checksum)
    return b"\x78\xda" + block * blocks + tail + struct.pack(">I", checksum)


def black_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A valid all-black PNG of any size: every scanline is filter byte 0 and zero samples."""
    scanline = 1 + width * _PNG_CHANNELS[mode]
    return (
        PNG_SIGNATURE
        + png_ihdr(width, height, mode)
        + png_chunk(b"IDAT", zlib_of_zeros(scanline * height))
        + png_chunk(b"IEND", b"")
    )


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose (valid) header declares `width`×`height` but whose data is one short black row."""
    return (
        PNG_SIGNATURE
        + png_ihdr(width, height)
        + png_chunk(b"IDAT", zlib.compress(bytes(1 + 3 * min(width, 64))))
        + png_chunk(b"IEND", b"")
    )


def corrupt_png_data(png: bytes) -> bytes:
    """The same PNG with the middle of its first IDAT payload overwritten (CRC left as it was)."""
    start = png.index(b"IDAT") + 4
    (length,) = struct.unpack(">I", png[start - 8 : start - 4])
    middle = start + length // 2
    return (
        png[:middle] + bytes(0xA5 for _ in range(min(64, length // 4))) + png[middle + min(64, length // 4) :]
    )


def _jpeg_segments(jpeg: bytes) -> list[tuple[int, int]]:
    """(marker, offset of the marker) for each segment before the entropy-coded data."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG: it does not start with the SOI marker FF D8")
    found, offset = [], 2
    while offset + 4 <= len(jpeg) and jpeg[offset] == 0xFF:
        marker = jpeg[offset + 1]
        found.append((marker, offset))
        if marker == 0xDA:  # start of scan: compressed data follows, no more headers to walk
            break
        (length,) = struct.unpack(">H", jpeg[offset + 2 : offset + 4])
        offset += 2 + length
    return found


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header (SOF0/SOF2) patched to declare `width`×`height`."""
    for marker, offset in _jpeg_segments(jpeg):
        if marker in (0xC0, 0xC2):
            # Segment layout: FF Cx, length (2), precision (1), height (2), width (2).
            size = struct.pack(">HH", height, width)
            return jpeg[: offset + 5] + size + jpeg[offset + 9 :]
    raise ValueError("the JPEG has no SOF0/SOF2 frame header to patch")


def jpeg_with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """Insert an APP1 segment (EXIF lives there) right after SOI, e.g. a corrupt EXIF block."""
    if len(payload) > 65533:
        raise ValueError(f"an APP1 payload holds at most 65533 bytes, got {len(payload)}")
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def iso_media_header(major_brand: bytes, compatible: Sequence[bytes]) -> bytes:
    """The start of an ISO base media file (HEIC, AVIF): an `ftyp` box and an empty `meta` box."""
    body = major_brand + struct.pack(">I", 0) + b"".join(compatible)
    ftyp = struct.pack(">I", 8 + len(body)) + b"ftyp" + body
    meta = struct.pack(">I", 12) + b"meta" + bytes(4)
    return ftyp + meta + bytes(256)


def encode_image(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _quoted(value: str) -> bytes:
    # Only the quote and backslash are escaped: CR, LF, NUL and bidi controls go out raw, as a
    # hostile client sends them (an ordinary client's encoder would percent-escape them).
    return b'"' + value.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8") + b'"'


def encode_multipart(
    files: Sequence[tuple[str, bytes, str]], field: str = "file", boundary: str = "convserve-hostile-boundary"
) -> tuple[bytes, str]:
    """A multipart/form-data body with one file part per entry; returns (body, Content-Type header)."""
    marker = boundary.encode("ascii")
    parts = []
    for filename, data, content_type in files:
        parts.append(
            b"--"
            + marker
            + b"\r\nContent-Disposition: form-data; name="
            + _quoted(field)
            + b"; filename="
            + _quoted(filename)
            + b"\r\nContent-Type: "
            + content_type.encode("ascii")
            + b"\r\n\r\n"
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + b"--" + marker + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary}"


# --- JPEG, marker by marker -----------------------------------------------------------------------

SOF_BASELINE, SOF_PROGRESSIVE, SOF_LOSSLESS = 0xC0, 0xC2, 0xC3
SOF_ARITHMETIC_PROGRESSIVE = 0xCA
_EOB_RUN_14 = 0xE0  # AC symbol "end-of-band run of 2**14 + 14 extra bits blocks"


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    """One marker segment: FF, the marker, a 2-byte length counting itself, the payload."""
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_frame_header(
    marker: int, width: int, height: int, sampling: Sequence[tuple[int, int]] = ((1, 1),), precision: int = 8
) -> bytes:
    """A SOFn segment: one component per (horizontal, vertical) sampling factor, ids 1, 2, ..."""
    payload = struct.pack(">BHHB", precision, height, width, len(sampling))
    for ident, (h, v) in enumerate(sampling, start=1):
        payload += bytes([ident, h << 4 | v, 0])
    return jpeg_segment(marker, payload)


def jpeg_huffman_table(table_class: int, ident: int, symbols: Sequence[int]) -> bytes:
    """A DHT segment giving symbol i the code of i ones then a zero: '0', '10', '110', ..."""
    counts = bytes(1 if i < len(symbols) else 0 for i in range(16))
    return jpeg_segment(0xC4, bytes([table_class << 4 | ident]) + counts + bytes(symbols))


def jpeg_scan_header(ids: Sequence[int], spectral: tuple[int, int], approximation: tuple[int, int]) -> bytes:
    """An SOS segment for components `ids` (tables 0), band `spectral`, bits (high, low)."""
    payload = bytes([len(ids)]) + b"".join(bytes([ident, 0]) for ident in ids)
    return jpeg_segment(0xDA, payload + bytes([*spectral, approximation[0] << 4 | approximation[1]]))


def entropy_coded(bits: str, repeat: int = 1) -> bytes:
    """Entropy-coded bytes of `bits` ('0'/'1') `repeat` times: padded with ones, 0xFF followed by 0x00.

    The repetitions are built a whole number of bytes at a time, so megabytes take milliseconds.
    """
    period = 8 // math.gcd(len(bits), 8) if bits else 1
    whole, rest = divmod(repeat, period)
    unit = bits * period
    data = int(unit, 2).to_bytes(len(unit) // 8, "big") * whole if unit else b""
    tail = bits * rest
    tail += "1" * (-len(tail) % 8)
    data += int(tail, 2).to_bytes(len(tail) // 8, "big") if tail else b""
    return data.replace(b"\xff", b"\xff\x00")


def _blocks(width: int, height: int) -> int:
    return -(-width // 8) * -(-height // 8)


def jpeg_scan_bomb(
    width: int,
    height: int,
    scans: int,
    *,
    components: int = 1,
    marker: int = SOF_PROGRESSIVE,
    with_data: bool = True,
) -> bytes:
    """A JPEG of `scans` AC scans over full-resolution components, a few bytes each.

    Progressive (SOF2): refinement scans, each ending every block's band with end-of-band runs of
    16384 blocks (code '0' and 14 zero bits; a run past the scan's end is harmless), so libjpeg
    checks all 63 coefficients of every block (its costliest per-block work). Arithmetic
    (SOF10): the same scans with no data (the decoder reads zeros). Sequential (SOF0): single-
    component scans, each coding every block as empty; the first leaves components out, so libjpeg
    keeps the whole coefficient array. No DC scan comes first: libjpeg only warns.
    """
    sampling = [(1, 1)] * components
    parts = [b"\xff\xd8", jpeg_segment(0xDB, bytes(1) + bytes([1] * 64))]
    parts.append(jpeg_frame_header(marker, width, height, sampling))
    if marker != SOF_ARITHMETIC_PROGRESSIVE:
        ac = 0x00 if marker == SOF_BASELINE else _EOB_RUN_14
        parts += [jpeg_huffman_table(0, 0, [0]), jpeg_huffman_table(1, 0, [ac])]
    blocks = _blocks(width, height)
    if marker == SOF_BASELINE:  # every block: DC difference 0 ('0'), end of block ('0')
        spectral, approximation, data = (0, 63), (0, 0), entropy_coded("00", blocks)
    else:
        spectral, approximation, data = (1, 63), (1, 0), entropy_coded("0" * 15, -(-blocks // 16384))
    if not with_data or marker == SOF_ARITHMETIC_PROGRESSIVE:
        data = b""
    for index in range(scans):
        parts += [jpeg_scan_header([1 + index % components], spectral, approximation), data]
    return b"".join(parts) + b"\xff\xd9"


def dense_jpeg(width: int, height: int, components: int = 1) -> bytes:
    """A baseline JPEG whose every coefficient is coded, 2 bits each: the most decoding per byte."""
    sampling = [(1, 1)] * components
    out = b"\xff\xd8" + jpeg_segment(0xDB, bytes(1) + bytes([1] * 64))
    out += jpeg_frame_header(SOF_BASELINE, width, height, sampling)
    out += jpeg_huffman_table(0, 0, [0]) + jpeg_huffman_table(1, 0, [0x01])  # AC: run 0, size 1
    out += jpeg_scan_header(list(range(1, components + 1)), (0, 63), (0, 0))
    return out + entropy_coded("0" + "01" * 63, _blocks(width, height) * components) + b"\xff\xd9"


def lossless_jpeg(width: int, height: int, components: int = 1, precision: int = 8) -> bytes:
    """A lossless (SOF3) JPEG, predictor 1, every difference zero: one bit a sample."""
    out = b"\xff\xd8" + jpeg_frame_header(SOF_LOSSLESS, width, height, [(1, 1)] * components, precision)
    out += jpeg_huffman_table(0, 0, [0])
    out += jpeg_scan_header(list(range(1, components + 1)), (1, 0), (0, 0))
    return out + bytes(width * height * components // 8) + b"\xff\xd9"


def jpeg_with_segments(jpeg: bytes, segment: bytes, count: int) -> bytes:
    """The JPEG with `count` copies of `segment` (or of any bytes: fill, junk) after its first segment."""
    first = _jpeg_segments(jpeg)[1][1]
    return jpeg[:first] + segment * count + jpeg[first:]


def jpeg_with_fill_run(jpeg: bytes, length: int) -> bytes:
    """The JPEG with `length` 0xFF fill bytes before its end marker (libjpeg re-reads a run whole)."""
    return jpeg[:-2] + b"\xff" * length + jpeg[-2:]


# --- PNG, GIF, WebP, BMP, EXIF --------------------------------------------------------------------


def png_with_chunks(png: bytes, chunks: bytes) -> bytes:
    """The PNG with `chunks` inserted before its first IDAT."""
    at = png.index(b"IDAT") - 4
    return png[:at] + chunks + png[at:]


def png_text_bomb(chunks: int, inflated: int, astral: bool = True) -> bytes:
    """`chunks` compressed iTXt chunks of `inflated` bytes each on a small black PNG.

    With one astral-plane character per chunk, Pillow keeps each as a str of 4 bytes a character.
    """
    text = ("\U0001f600" if astral else "a") + "a" * (inflated - 4)
    body = zlib.compress(text.encode(), 9)
    bombs = b"".join(png_chunk(b"iTXt", b"k%d\x00\x01\x00\x00\x00" % i + body) for i in range(chunks))
    return png_with_chunks(black_png(64, 64), bombs)


def png_rows(
    width: int, height: int, depth: int, colour: int, *, interlace: bool = False, seed: int = 0
) -> bytes:
    """A PNG of random Paeth-filtered rows, stored uncompressed: the costliest rows to unfilter."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    rng = np.random.default_rng(seed)
    passes = (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    )
    raw = b""
    for x0, y0, dx, dy in passes if interlace else ((0, 0, 1, 1),):
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            block = rng.integers(0, 256, (rows, 1 + -(-columns * channels * depth // 8)), dtype=np.uint8)
            block[:, 0] = 4
            raw += block.tobytes()
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlace))
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw, 0))
        + png_chunk(b"IEND", b"")
    )


def _gif_sub_blocks(data: bytes) -> bytes:
    return (
        b"".join(bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255))
        + b"\x00"
    )


def gif_with_lzw(width: int, height: int, lzw: bytes, before_frame: bytes = b"") -> bytes:
    """A GIF89a of one frame, 4-colour global palette, with LZW codes (minimum code size 2) `lzw`."""
    screen = struct.pack("<HHBBB", width, height, 0x81, 0, 0) + bytes(12)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + before_frame + descriptor + b"\x02" + _gif_sub_blocks(lzw) + b";"


def lzw_clear_codes(length: int) -> bytes:
    """`length` bytes of LZW clear codes (3-bit code 4, eight to three bytes): no pixel comes out."""
    return (0b100100100100100100100100).to_bytes(3, "little") * (length // 3)


def gif_comment(length: int) -> bytes:
    """A GIF comment extension of `length` bytes in 255-byte sub-blocks (Pillow reads each in Python)."""
    return b"!\xfe" + _gif_sub_blocks(b"x" * length)


def _riff_chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) & 1)


def webp_animation(frames: int, canvas: tuple[int, int] = (64, 64)) -> bytes:
    """An animated WebP of `frames` identical 16x16 lossless frames (~50 bytes each)."""
    still = encode_image(Image.new("RGB", (16, 16), (10, 20, 30)), "WEBP", lossless=True)
    image_chunk = still[12:]
    width, height = canvas
    vp8x = _riff_chunk(
        b"VP8X", b"\x02" + bytes(3) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    )
    anim = _riff_chunk(b"ANIM", bytes(6))
    frame = _riff_chunk(
        b"ANMF",
        bytes(6) + (15).to_bytes(3, "little") * 2 + (100).to_bytes(3, "little") + b"\x00" + image_chunk,
    )
    body = b"WEBP" + vp8x + anim + frame * frames
    return b"RIFF" + struct.pack("<I", len(body)) + body


def bmp_rle(width: int, height: int, codes: bytes, rle4: bool = False) -> bytes:
    """A run-length-encoded BMP (RLE8, or RLE4) with a black palette and the given codes."""
    bits = 4 if rle4 else 8
    palette = bytes(4 << bits)
    offset = 14 + 40 + len(palette)
    info = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, bits, 2 if rle4 else 1, len(codes), 2835, 2835, 1 << bits, 0
    )
    return b"BM" + struct.pack("<IHHI", offset + len(codes), 0, 0, offset) + info + palette + codes


def exif_block(entries: int, orientation: int = 6) -> bytes:
    """An APP1-style EXIF block (Exif header, little-endian TIFF) whose first IFD has `entries` tags."""
    tags = [(0x0112, struct.pack("<HH", orientation, 0))] if orientation else []
    tag = 0x0001
    while len(tags) < entries:
        if tag != 0x0112:
            tags.append((tag, struct.pack("<HH", 7, 0)))
        tag += 1
    tags.sort()
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHI4s", t, 3, 1, v) for t, v in tags)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + bytes(4)
