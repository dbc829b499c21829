"""What decoding an uploaded image costs, read from its bytes before Pillow decodes it, and the budget.

The declared pixel area does not bound the cost of a decode. Measured on one core of the reference
machine (Pillow 13.0, libjpeg-turbo 3.2, zlib 1.2.13, libwebp 1.6), this is what the bytes of a file
turn into (`benchmarks.crafted_files` builds the worst case of each line; the figures in the
`_NS_*` constants below are those worst cases, rounded up):

JPEG  - Header segments are walked by Pillow in Python: ~1 µs each, fill and junk bytes between them
        one at a time (~0.3 µs each), payloads copied and kept (~1.2 ns a byte); APP1 Exif payloads
        are concatenated (quadratic in their count) and their first IFD parsed (~1.6 µs an entry, at
        most 65,535).
      - Progressive frames (SOF2/6/10/14), and sequential ones whose first scan leaves a component
        out, make libjpeg keep every DCT coefficient: 128 bytes per 8x8 block of every component at
        full size, whatever the DCT scaling (8000x5000 4:4:4: 229 MiB; 12 MP 4:2:0: 34 MiB). Every
        scan then walks every block of its components, data or not: ~4 ns a block for an empty scan,
        36 ns for a refinement scan covering it with one end-of-band run, 52 ns arithmetic-coded. A
        scan header is 10 bytes, so 7 KB of 200 scans over 12 MP cost 1.5 s and 1,000 scans 7 s.
        Scans are counted conservatively: every `FF DA` after the first scan header (entropy-coded
        data never holds one; later segments and appended images may). A single-scan (baseline)
        decode walks each block once: 14 ns (Huffman) to 28 ns (arithmetic), output included.
      - Entropy-coded bytes cost up to ~17 ns each (2-bit Huffman codes, every coefficient set; 40 MB
        of them: 0.65 s); photos ~8 ns. A run of 0xFF fill bytes is re-read whole each time Pillow
        feeds libjpeg 64 KiB more (quadratic: 13 MB cost 0.95 s), so long runs are refused.
      - Output at the decoded (DCT-scaled) size: ~3 ns a pixel. Lossless frames (SOF3/7/11/15) have
        no DCT scaling (Pillow's draft breaks them): full size, ~5 ns a sample. 12-bit and
        hierarchical frames are refused up front, as Pillow or libjpeg would after the header.
PNG   - Every chunk is a Python step in Pillow (~2.6 µs): 100,000 empty chunks cost 0.22 s. zTXt,
        iTXt and iCCP inflate to 1 MiB each and 64 MiB in all (Pillow's limits, ~3 ns a byte), kept
        as str at up to 4 bytes a character: 67 KB of iTXt held 260 MiB. Unknown chunks are kept.
      - Rows: every raw byte (filter byte and samples, 16-bit included) is inflated and unfiltered
        at up to ~7.7 ns (Paeth, incompressible): 0.27 s for 16-bit RGBA at the 4-MP decode limit.
        Adam7 interlacing does the same bytes in seven passes.
GIF   - Extension sub-blocks before the first frame, and junk between blocks, are Python steps
        (~0.6 µs; ~0.3 µs a junk byte); comments are kept. LZW data costs ~5 ns a byte even when it
        draws nothing (clear codes: 20 MB, 0.1 s). Only the first frame is decoded.
WebP  - Pillow reads the whole file; libwebp indexes every animation frame (~200 bytes, ~0.2 µs
        each: 1,000,000 frames held 190 MiB) and decodes the first into two RGBA canvases, copied
        again by Pillow: ~16 bytes a pixel besides the RGB image (the whole working budget at the
        4-MP decode limit), up to ~80 ns a pixel (lossy noise).
BMP   - Raw bitmaps cost their pixels (~1 ns). RLE8/RLE4 are decoded by Pillow in Python: ~0.9 µs
        per 2-byte code, codes that draw nothing included, and RLE4 ~80 ns a pixel.
All   - The decoded image in its own mode, then 8-bit RGB (up to ~2 ns a pixel; 16-bit through
        int32, ~5 ns and 6 bytes a pixel of temporaries), then the evaluation transform (~4 ns a
        decoded pixel). EXIF is parsed for the orientation only.

So `inspect` reads a file's structure (bounded walks, no pixel), refusing what is over a structural
limit, and `check` estimates the decode at the size it will be decoded at from the worst per-unit
costs, refusing anything over `MAX_DECODE_CPU_S` or `MAX_WORKING_BYTES` with a 422 before Pillow
decodes it. The unit counts do not depend on the machine; the per-unit costs are this machine's.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from service.errors import InvalidInputError

MiB = 1 << 20
MAX_DECODE_CPU_S = 0.5
"""Estimated worst-case CPU one image may cost to decode and transform, in seconds of one core.
A normal 2-MP JPEG costs ~0.03 s; a request deadline interrupts a decode only between two reads of
the file, so this also bounds how far a decode can overrun the deadline."""
MAX_WORKING_BYTES = 64 * MiB
"""Estimated peak memory one decode may hold besides the decoded 8-bit RGB image, in bytes."""
MAX_METADATA_BYTES = 4 * MiB
"""Metadata one file may carry (EXIF, XMP, ICC profiles, text, comments, unknown chunks), in bytes
once inflated; Pillow parses and keeps all of it, and the model uses none."""
MAX_EXIF_BYTES = 65_536
"""EXIF one file may carry, in bytes: what one JPEG APP1 segment can hold, and so what cameras write.
Pillow parses every entry in Python while holding the GIL (~1.7 µs each), which stalls the event loop
and every other decode: 780 KB of EXIF (65,000 entries) cost 0.11 s, 64 KiB at most ~9 ms."""
MAX_CONTAINER_STEPS = 16_384
"""Segments, chunks, sub-blocks or frames a file may hold before or besides its pixels, a count:
Pillow walks each in Python (a PNG written in 8 KiB chunks has ~4,000 at the 4-MP decode limit)."""
MAX_JPEG_SCANS = 256
"""Scans one JPEG may hold (libjpeg's default progression has 10, mozjpeg's about 20), a count."""
MAX_JUNK_BYTES = 65_536
"""Bytes between JPEG segments or GIF blocks that Pillow skips one at a time in Python."""
MAX_JPEG_FILL_RUN = 262_144
"""Longest run of 0xFF fill bytes after the first JPEG scan header (libjpeg re-reads a run whole each
time Pillow feeds it more data), in bytes."""

# Worst costs per unit on the reference machine, in nanoseconds (see the module docstring).
_NS_JPEG_SEGMENT = 1_500
_NS_JUNK_BYTE = 400
_NS_COPY_BYTE = 0.2
_NS_METADATA_BYTE = 1.5  # read, copied and kept by Pillow
_NS_IFD_ENTRY = 2_000
_NS_JPEG_BLOCK_PASS = 55  # multi-scan: per block, per scan (and the output pass)
_NS_JPEG_BLOCK_SEQUENTIAL = 30  # one scan, output at reduced size included
_NS_JPEG_CODED_BYTE = 18
_NS_JPEG_OUTPUT_PIXEL = 5
_NS_LOSSLESS_SAMPLE = 6
_NS_PNG_CHUNK = 3_000
_NS_PNG_RAW_BYTE = 8
_NS_INFLATE_BYTE = 4
_NS_GIF_STEP = 800
_NS_GIF_BYTE = 6
_NS_WEBP_PIXEL = 85
_NS_WEBP_FRAME = 250
_NS_BMP_RLE_CODE = 1_000
_NS_BMP_RLE4_PIXEL = 90
_NS_BMP_PIXEL = 2
_NS_TO_RGB_PIXEL = 4
_NS_SIXTEEN_BIT_PIXEL = 8
_NS_TRANSFORM_PIXEL = 7
# Memory per unit, in bytes.
_JPEG_BLOCK_BYTES = 128  # 64 coefficients of 2 bytes
_METADATA_COPIES = 4  # text kept as str at up to 4 bytes a character, next to its bytes
_WEBP_CANVAS_BYTES = 16  # libwebp's two RGBA canvases, the frame it hands over and Pillow's image
_WEBP_FRAME_BYTES = 200
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_TO_RGB_TEMPORARY_BYTES = 6  # 16-bit: an int32 copy, the 8-bit result and its L image


@dataclass(frozen=True)
class Cost:
    """One term of a decode's estimated cost, what in the file causes it and how to avoid it."""

    cpu_s: float
    working_bytes: int
    cause: str
    fix: str


def _ns(count: float, nanoseconds: float) -> float:
    return count * nanoseconds * 1e-9


def check(costs: Iterable[Cost], name: str, kind: str) -> None:
    """Refuse (422) a decode whose estimated memory or CPU is over the budget, naming its main cause."""
    terms = list(costs)
    working = sum(term.working_bytes for term in terms)
    cpu = sum(term.cpu_s for term in terms)
    if working > MAX_WORKING_BYTES:
        worst = max(terms, key=lambda term: term.working_bytes)
        raise InvalidInputError(
            f"{name}: decoding this {kind} would hold about {working / MiB:.0f} MiB besides the image, "
            f"over the budget of {MAX_WORKING_BYTES // MiB} MiB per image, mostly for {worst.cause}; "
            f"{worst.fix}"
        )
    if cpu > MAX_DECODE_CPU_S:
        worst = max(terms, key=lambda term: term.cpu_s)
        raise InvalidInputError(
            f"{name}: decoding this {kind} could take up to {cpu:.2f} s of CPU, over the budget of "
            f"{MAX_DECODE_CPU_S:g} s per image, mostly for {worst.cause}; {worst.fix}"
        )


def pixel_costs(size: tuple[int, int], mode: str) -> Cost:
    """Holding the decoded image in its own mode, converting it to 8-bit RGB and transforming it."""
    pixels = size[0] * size[1]
    native = 0 if mode == "RGB" else _MODE_BYTES.get(mode, 4) * pixels
    sixteen = mode in _SIXTEEN_BIT_MODES
    per_pixel = _NS_TRANSFORM_PIXEL + (_NS_SIXTEEN_BIT_PIXEL if sixteen else _NS_TO_RGB_PIXEL)
    return Cost(
        _ns(pixels, per_pixel),
        native + (_TO_RGB_TEMPORARY_BYTES * pixels if sixteen else 0),
        f"{size[0]}x{size[1]} decoded {mode} pixels",
        "downscale it",
    )


def _metadata_cost(metadata: int, ifd_bytes: int, copied: int, fmt: str) -> Cost:
    entries = min(65_535, ifd_bytes // 12)
    return Cost(
        _ns(entries, _NS_IFD_ENTRY) + _ns(copied, _NS_COPY_BYTE) + _ns(metadata, _NS_METADATA_BYTE),
        _METADATA_COPIES * metadata,
        f"{metadata:,} bytes of metadata",
        f"strip the metadata (EXIF, XMP, ICC, text) from the {fmt}",
    )


def _refuse_metadata(metadata: int, name: str, fmt: str) -> None:
    if metadata > MAX_METADATA_BYTES:
        raise InvalidInputError(
            f"{name}: this {fmt} carries {metadata:,} bytes of metadata (EXIF, XMP, ICC, text), over the "
            f"limit of {MAX_METADATA_BYTES:,}; strip the metadata before sending it"
        )


def _refuse_exif(exif: int, name: str, fmt: str) -> None:
    if exif > MAX_EXIF_BYTES:
        raise InvalidInputError(
            f"{name}: this {fmt} carries {exif:,} bytes of EXIF, over the limit of {MAX_EXIF_BYTES:,} (what "
            "one JPEG segment holds); strip the metadata before sending it"
        )


def _junk_error(name: str, fmt: str, where: str) -> InvalidInputError:
    return InvalidInputError(
        f"{name}: this {fmt} has more than {MAX_JUNK_BYTES:,} bytes of fill or junk {where}, which Pillow "
        "steps over one at a time; re-save it with a standard encoder"
    )


def _refuse_steps(steps: int, what: str, name: str, fmt: str, fix: str) -> None:
    if steps > MAX_CONTAINER_STEPS:
        raise InvalidInputError(
            f"{name}: this {fmt} has more than {MAX_CONTAINER_STEPS:,} {what}, each parsed on its own; {fix}"
        )


class DecodePlan:
    """What a file's structure says about decoding it; `costs` adds the decoded size and mode."""

    kind = "image"

    @property
    def reducible(self) -> bool:
        """Whether Pillow's draft() can shrink the decode (JPEG DCT scaling)."""
        return False

    def costs(self, size: tuple[int, int], mode: str) -> list[Cost]:
        return [pixel_costs(size, mode)]


def inspect(data: bytes, name: str) -> DecodePlan:
    """The plan for `data`, by its signature, as Pillow will pick its plugin.

    Raises `InvalidInputError` for structure that is over a limit before any pixel (too much
    metadata, too many segments or scans, junk), or that cannot be read: Pillow or libjpeg would
    refuse such a file too, and a plan without its counts would skip the budget. Files in no
    accepted format get a plain plan: Pillow refuses them at once.
    """
    try:
        if data[:3] == b"\xff\xd8\xff":
            return _inspect_jpeg(data, name)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return _inspect_png(data, name)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _inspect_webp(data, name)
        if data[:2] == b"BM":
            return _inspect_bmp(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _inspect_gif(data, name)
    except (struct.error, IndexError) as exc:
        raise InvalidInputError(
            f"{name}: the structure of this file cannot be read ({exc}); re-save it with a standard encoder"
        ) from exc
    return DecodePlan()


# --- JPEG -------------------------------------------------------------------------------------------

_JPEG_MARKER = re.compile(rb"\xff([^\x00\xff])")
# Markers Pillow reads a length for (all others it steps over, or refuses as "no marker found").
_JPEG_WITH_LENGTH = frozenset(
    [*range(0xC0, 0xC8), *range(0xC9, 0xD0), *range(0xDA, 0xE0), *range(0xE0, 0xF0), 0xFE]
)
_JPEG_STANDALONE = frozenset([0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)])
_JPEG_FRAMES = frozenset(
    [*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xDE]
)
_PROGRESSIVE = frozenset([0xC2, 0xC6, 0xCA, 0xCE])
_LOSSLESS = frozenset([0xC3, 0xC7, 0xCB, 0xCF])
_HIERARCHICAL = frozenset([0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF, 0xDE])


@dataclass(frozen=True)
class JpegFrame:
    """A JPEG frame header: the coding process and the 8x8 blocks of each component, by component id."""

    marker: int
    width: int
    height: int
    blocks: dict[int, int]
    """Blocks of each component as libjpeg allocates them (rounded up to its sampling factors)."""

    @classmethod
    def parse(cls, marker: int, payload: bytes, name: str) -> JpegFrame:
        precision, height, width, count = struct.unpack_from(">BHHB", payload)
        if precision != 8:
            raise InvalidInputError(
                f"{name}: this is a {precision}-bit JPEG; only 8-bit JPEGs are decoded, re-encode it as an "
                "8-bit baseline JPEG"
            )
        if marker in _HIERARCHICAL:
            raise InvalidInputError(
                f"{name}: this is a hierarchical (differential) JPEG, which the decoder does not support; "
                "re-encode it as a baseline JPEG"
            )
        listed = min(count, (len(payload) - 6) // 3)  # libjpeg refuses a frame shorter than declared
        factors = [
            (payload[6 + 3 * i], payload[7 + 3 * i] >> 4, payload[7 + 3 * i] & 15) for i in range(listed)
        ]
        max_h = max((h for _, h, _ in factors), default=1) or 1
        max_v = max((v for _, _, v in factors), default=1) or 1
        blocks = {}
        for ident, h, v in factors:
            across = math.ceil(math.ceil(width * h / max_h) / 8)
            down = math.ceil(math.ceil(height * v / max_v) / 8)
            blocks[ident] = _round_up(across, max(h, 1)) * _round_up(down, max(v, 1))
        return cls(marker, width, height, blocks)

    @property
    def total_blocks(self) -> int:
        return sum(self.blocks.values())

    def scan_blocks(self, header: bytes) -> int:
        """Blocks one scan walks, from its header; a header libjpeg would refuse counts them all."""
        count = header[0] if header else 0
        if not 1 <= count <= 4 or len(header) < 1 + 2 * count:
            return self.total_blocks
        largest = max(self.blocks.values(), default=0)
        return sum(self.blocks.get(header[1 + 2 * i], largest) for i in range(count))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class JpegPlan(DecodePlan):
    frame: JpegFrame | None
    multi_scan: bool
    """libjpeg keeps the whole coefficient array (progressive, or a first scan without every component)."""
    scans: int
    block_passes: int
    coded_bytes: int
    steps: int
    junk: int
    metadata: int
    ifd_bytes: int
    copied: int

    kind = "JPEG"

    @property
    def reducible(self) -> bool:
        return self.frame is not None and self.frame.marker not in _LOSSLESS

    def costs(self, size: tuple[int, int], mode: str) -> list[Cost]:
        header = Cost(
            _ns(self.steps, _NS_JPEG_SEGMENT) + _ns(self.junk, _NS_JUNK_BYTE),
            0,
            f"{self.steps:,} header segments",
            "re-save it with a standard encoder",
        )
        costs = [
            header,
            _metadata_cost(self.metadata, self.ifd_bytes, self.copied, "JPEG"),
            pixel_costs(size, mode),
        ]
        frame = self.frame
        if frame is None:
            return costs
        if frame.marker in _LOSSLESS:
            samples = size[0] * size[1] * len(frame.blocks)
            lossless = Cost(
                _ns(samples, _NS_LOSSLESS_SAMPLE),
                2 * samples if self.multi_scan else 0,
                f"{samples:,} lossless samples",
                "re-encode it as a baseline JPEG",
            )
            return [*costs, lossless]
        kind = "progressive" if frame.marker in _PROGRESSIVE else "multi-scan"
        blocks = f"{frame.width}x{frame.height} ({frame.total_blocks:,} blocks of 8x8)"
        coefficients = _JPEG_BLOCK_BYTES * frame.total_blocks if self.multi_scan else 0
        return [
            *costs,
            Cost(
                0,
                coefficients,
                f"the DCT coefficients of a {kind} {blocks}",
                "re-encode it as a baseline JPEG",
            ),
            Cost(
                _ns(self.block_passes, _NS_JPEG_BLOCK_PASS if self.multi_scan else _NS_JPEG_BLOCK_SEQUENTIAL),
                0,
                f"{self.scans} scans over a {blocks} ({self.block_passes:,} block passes)",
                "re-encode it as a baseline JPEG, or downscale it",
            ),
            Cost(
                _ns(self.coded_bytes, _NS_JPEG_CODED_BYTE),
                0,
                f"{self.coded_bytes:,} bytes of compressed data",
                "re-encode it at a lower quality, or downscale it",
            ),
            Cost(
                _ns(size[0] * size[1], _NS_JPEG_OUTPUT_PIXEL),
                0,
                f"{size[0]}x{size[1]} output pixels",
                "downscale it",
            ),
        ]


def _inspect_jpeg(data: bytes, name: str) -> JpegPlan:
    """Walk the segments as Pillow does, up to the first scan header; then count the scans."""
    pos, steps, junk, metadata, exif, copied, mpf = 2, 0, 0, 0, 0, 0, 0
    frame: JpegFrame | None = None
    first_scan: bytes | None = None
    while first_scan is None:
        window = pos + MAX_JUNK_BYTES - junk + 2  # a bounded search: past it, Pillow would step too far
        marker = _JPEG_MARKER.search(data, pos, window)
        if marker is None:
            if window < len(data):
                raise _junk_error(name, "JPEG", "between its header segments")
            break  # no scan at all: Pillow refuses the file
        junk += marker.start() - pos
        steps += 1
        _refuse_steps(steps, "header segments", name, "JPEG", "re-save it with a standard encoder")
        code, pos = marker[1][0], marker.end()
        if code in _JPEG_STANDALONE:
            continue
        if code not in _JPEG_WITH_LENGTH:
            break  # Pillow refuses: "no marker found"
        length = int.from_bytes(data[pos : pos + 2], "big")
        payload, pos = data[pos + 2 : pos + length], pos + max(length, 2)
        if code == 0xDA:
            first_scan = payload
            break
        metadata += len(payload)
        if code == 0xE1 and payload.startswith(b"Exif\x00\x00"):
            exif += len(payload)
            copied += exif  # Pillow appends each Exif segment to a new copy of the ones before
        elif code == 0xE2 and payload.startswith(b"MPF\x00"):
            mpf = len(payload)
        elif code in _JPEG_FRAMES:
            if frame is not None:
                raise InvalidInputError(
                    f"{name}: this JPEG has two frame headers; re-save it with a standard encoder"
                )
            frame = JpegFrame.parse(code, payload, name)
        _refuse_metadata(metadata, name, "JPEG")
        _refuse_exif(exif, name, "JPEG")
    scans, passes, multi = 0, 0, False
    if frame is not None and first_scan is not None:
        scans, passes, multi = _count_scans(data, pos, frame, first_scan, name)
    return JpegPlan(frame, multi, scans, passes, len(data) - pos, steps, junk, metadata, exif + mpf, copied)


def _count_scans(data: bytes, start: int, frame: JpegFrame, first: bytes, name: str) -> tuple[int, int, bool]:
    """(scans, block passes, multi-scan) from the first scan header on, counted conservatively."""
    if data.find(b"\xff" * MAX_JPEG_FILL_RUN, start) >= 0:
        raise InvalidInputError(
            f"{name}: this JPEG has a run of more than {MAX_JPEG_FILL_RUN:,} 0xFF fill bytes after its first "
            "scan; re-save it with a standard encoder"
        )
    multi = frame.marker in _PROGRESSIVE or (first[0] if first else 0) < len(frame.blocks)
    if not multi:
        # libjpeg decodes the one scan as it reads it, and stops with an error at any second one.
        return 1, frame.total_blocks, False
    scans = 1 + data.count(b"\xff\xda", start)
    if scans > MAX_JPEG_SCANS:
        raise InvalidInputError(
            f"{name}: this JPEG has {scans:,} scans (more than {MAX_JPEG_SCANS}), and every scan walks the "
            "whole image; re-encode it as a baseline JPEG"
        )
    passes = frame.scan_blocks(first) + frame.total_blocks  # the first scan, and the output pass
    at = data.find(b"\xff\xda", start)
    while at >= 0:
        header = data[at + 4 : at + 4 + 1 + 2 * 4]
        passes += frame.scan_blocks(header)
        at = data.find(b"\xff\xda", at + 2)
    return scans, passes, True


# --- PNG --------------------------------------------------------------------------------------------

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_PIXEL_CHUNKS = frozenset([b"IHDR", b"PLTE", b"IDAT", b"IEND", b"fdAT", b"fcTL", b"acTL", b"tRNS"])
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


@dataclass(frozen=True)
class PngPlan(DecodePlan):
    chunks: int
    metadata: int
    exif: int
    raw_bytes: int

    kind = "PNG"

    def costs(self, size: tuple[int, int], mode: str) -> list[Cost]:
        return [
            Cost(
                _ns(self.chunks, _NS_PNG_CHUNK),
                0,
                f"{self.chunks:,} chunks",
                "re-save it with a standard encoder",
            ),
            _metadata_cost(self.metadata, self.exif, 0, "PNG"),
            Cost(_ns(self.metadata, _NS_INFLATE_BYTE), 0, "inflating its text", "strip the metadata"),
            Cost(
                _ns(self.raw_bytes, _NS_PNG_RAW_BYTE), 0, f"{self.raw_bytes:,} bytes of rows", "downscale it"
            ),
            pixel_costs(size, mode),
        ]


def _png_raw_bytes(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Filter bytes and samples the decoder inflates and unfilters."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if columns:
            total += rows * (1 + -(-columns * bits_per_pixel // 8))
    return total


def _inflated_metadata(kind: bytes, body: bytes, room: int) -> int:
    """Bytes a zTXt, iTXt or iCCP chunk inflates to, up to `room` + 1 (the work is bounded by `room`)."""
    key_end = body.find(b"\x00")
    if kind == b"iTXt":
        compressed = body[key_end + 1 : key_end + 2] == b"\x01"
        rest = body[key_end + 3 :]
        for _ in range(2):  # language tag, translated keyword
            rest = rest[rest.find(b"\x00") + 1 :]
        if not compressed:
            return len(rest)
        stream = rest
    else:
        stream = body[key_end + 2 :]
    try:
        inflater = zlib.decompressobj()
        return len(inflater.decompress(stream, room + 1))
    except zlib.error:
        return len(body)  # Pillow ignores a broken stream; its bytes are still read


def _inspect_png(data: bytes, name: str) -> PngPlan:
    pos, chunks, metadata, exif, raw = 8, 0, 0, 0, 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        chunks += 1
        _refuse_steps(chunks, "chunks", name, "PNG", "re-save it with a standard encoder")
        if kind == b"IEND":
            break
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", body)
            raw = _png_raw_bytes(width, height, depth * _PNG_CHANNELS.get(colour, 4), interlace == 1)
        elif kind in (b"zTXt", b"iTXt", b"iCCP"):
            size = _inflated_metadata(kind, body, MAX_METADATA_BYTES - metadata)
            metadata += size
            if body.startswith(b"Raw profile type exif\x00"):
                exif += size // 2
        elif kind not in _PNG_PIXEL_CHUNKS:
            metadata += length
            if kind == b"eXIf":
                exif += length
            elif body.startswith(b"Raw profile type exif\x00"):
                exif += length // 2
        _refuse_metadata(metadata, name, "PNG")
        _refuse_exif(exif, name, "PNG")
    return PngPlan(chunks, metadata, exif, raw)


# --- GIF --------------------------------------------------------------------------------------------

_GIF_BLOCK = re.compile(rb"[!,;]")


@dataclass(frozen=True)
class GifPlan(DecodePlan):
    steps: int
    junk: int
    metadata: int
    coded_bytes: int

    kind = "GIF"

    def costs(self, size: tuple[int, int], mode: str) -> list[Cost]:
        return [
            Cost(
                _ns(self.steps, _NS_GIF_STEP) + _ns(self.junk, _NS_JUNK_BYTE),
                _METADATA_COPIES * self.metadata,
                f"{self.steps:,} extension blocks",
                "re-save it without comments or extensions",
            ),
            Cost(
                _ns(self.coded_bytes, _NS_GIF_BYTE),
                0,
                f"{self.coded_bytes:,} bytes of LZW data",
                "downscale it",
            ),
            pixel_costs(size, mode),
        ]


def _inspect_gif(data: bytes, name: str) -> GifPlan:
    """Walk the blocks before the first frame as Pillow does (it decodes that frame only)."""
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    steps, junk, metadata = 0, 0, 0
    while (block := _GIF_BLOCK.search(data, pos, pos + MAX_JUNK_BYTES - junk + 1)) is not None:
        junk += block.start() - pos  # Pillow steps over other bytes one at a time
        if block[0] != b"!":
            pos = block.end()
            break  # the first frame (or the trailer): Pillow's LZW decoder takes over
        label, pos = data[block.start() + 1], block.start() + 2
        while pos < len(data) and data[pos]:  # sub-blocks, up to the empty terminator
            steps += 1
            metadata += data[pos] if label == 0xFE else 0
            pos += 1 + data[pos]
        pos += 1
        _refuse_steps(steps, "extension sub-blocks", name, "GIF", "re-save it without comments or extensions")
        _refuse_metadata(metadata, name, "GIF")
    if block is None and len(data) - pos > MAX_JUNK_BYTES - junk + 1:
        raise _junk_error(name, "GIF", "between its blocks")
    coded = _first_frame_lzw_bytes(data, pos, name) if block is not None and block[0] == b"," else 0
    return GifPlan(steps, junk, metadata, coded)


def _first_frame_lzw_bytes(data: bytes, pos: int, name: str) -> int:
    """The LZW bytes of the first frame (its descriptor starts at `pos`); 422 past what its pixels use.

    Every LZW code draws at least one pixel, except clear codes, which encoders send once per 4,096
    codes at most, and a code is at most 12 bits: a frame of P pixels needs under 1.5 P bytes. Pillow
    decodes until the frame's data ends, so 20 MB of clear codes over a tiny frame cost 0.1 s and end
    as "truncated"; the walk stops as soon as the frame's data passes `2 P + 64 KiB`.
    """
    if len(data) < pos + 10:
        return 0
    width, height, flags = struct.unpack_from("<HHB", data, pos + 4)
    pos += 9 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1  # descriptor, colour table, code size
    limit, coded = 2 * width * height + 65_536, 0
    while pos < len(data) and data[pos]:
        coded += data[pos]
        pos += 1 + data[pos]
        if coded > limit:
            raise InvalidInputError(
                f"{name}: the first frame of this GIF ({width}x{height}) carries more than {limit:,} bytes "
                "of LZW data, more than its pixels can use; re-save it with a standard encoder"
            )
    return coded


# --- WebP -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebpPlan(DecodePlan):
    frames: int
    metadata: int
    exif: int

    kind = "WebP"

    def costs(self, size: tuple[int, int], mode: str) -> list[Cost]:
        pixels = size[0] * size[1]
        return [
            Cost(
                _ns(self.frames, _NS_WEBP_FRAME),
                _WEBP_FRAME_BYTES * self.frames,
                f"{self.frames:,} animation frames",
                "send one frame as a still image",
            ),
            _metadata_cost(self.metadata, self.exif, 0, "WebP"),
            Cost(
                _ns(pixels, _NS_WEBP_PIXEL),
                _WEBP_CANVAS_BYTES * pixels,
                f"a {size[0]}x{size[1]} canvas",
                "downscale it",
            ),
            pixel_costs(size, mode),
        ]


def _inspect_webp(data: bytes, name: str) -> WebpPlan:
    pos, chunks, frames, metadata, exif = 12, 0, 0, 0, 0
    while pos + 8 <= len(data):
        kind, length = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + length + (length & 1)
        chunks += 1
        _refuse_steps(chunks, "chunks (animation frames)", name, "WebP", "send one frame as a still image")
        if kind == b"ANMF":
            frames += 1
        elif kind not in (b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM"):
            metadata += length
            exif += length if kind == b"EXIF" else 0
        _refuse_metadata(metadata, name, "WebP")
        _refuse_exif(exif, name, "WebP")
    return WebpPlan(frames, metadata, exif)


# --- BMP --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BmpPlan(DecodePlan):
    compression: int
    coded_bytes: int

    kind = "BMP"

    def costs(self, size: tuple[int, int], mode: str) -> list[Cost]:
        pixels = size[0] * size[1]
        costs = [
            Cost(_ns(pixels, _NS_BMP_PIXEL), 0, f"{size[0]}x{size[1]} pixels", "downscale it"),
            pixel_costs(size, mode),
        ]
        if self.compression in (1, 2):  # RLE8, RLE4: decoded in Python, one 2-byte code at a time
            rle4 = self.compression == 2
            costs.append(
                Cost(
                    _ns(self.coded_bytes / 2, _NS_BMP_RLE_CODE)
                    + (_ns(pixels, _NS_BMP_RLE4_PIXEL) if rle4 else 0),
                    2 * pixels,
                    f"{self.coded_bytes:,} bytes of run-length codes",
                    "send it as PNG instead of run-length-encoded BMP",
                )
            )
        return costs


def _inspect_bmp(data: bytes) -> BmpPlan:
    (offset,) = struct.unpack_from("<I", data, 10)
    (header,) = struct.unpack_from("<I", data, 14)
    compression = struct.unpack_from("<I", data, 30)[0] if header >= 40 else 0
    return BmpPlan(compression, max(0, len(data) - offset))
