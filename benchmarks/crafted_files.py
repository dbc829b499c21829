"""Byte-level builders for malformed and extreme image files, and a raw multipart/form-data encoder.

Pillow can write ordinary images, but not the lies a hostile client tells: a PNG header that declares
100000×100000 pixels over a few bytes of data, a JPEG frame header patched to 65000×65000, a
one-pixel-wide PNG 39 million rows tall that compresses to ~80 KB. These are written here chunk by
chunk, with valid checksums, so the file gets past format sniffing and exercises the decoder itself.
Everything is deterministic and built in memory.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence

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
