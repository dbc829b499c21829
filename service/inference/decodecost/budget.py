"""The decode budget: what decoding an image costs per unit of its structure, the limits, and the check.

The declared pixel area does not bound the cost of a decode. Measured on one core of the reference
machine (Pillow 13.0, libjpeg-turbo 3.2, zlib 1.2.13, libwebp 1.6), this is what the bytes of a file
turn into (`benchmarks.robustness.crafted_files` builds the worst case of each line; the figures in the
`NS_*` constants below are those worst cases, rounded up):

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

Each format's walker (`jpeg`, `png`, `gif`, `webp`, `bmp`) counts these units from a file's bytes and
refuses what is over a structural limit with the helpers below; `check` prices the counts at the size
the file will be decoded at from the worst per-unit costs, refusing anything over `MAX_DECODE_CPU_S` or
`MAX_WORKING_BYTES`. The unit counts do not depend on the machine; the per-unit costs are the reference
machine's.
"""

from __future__ import annotations

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
NS_JPEG_SEGMENT = 1_500
NS_JUNK_BYTE = 400
NS_COPY_BYTE = 0.2
NS_METADATA_BYTE = 1.5  # read, copied and kept by Pillow
NS_IFD_ENTRY = 2_000
NS_JPEG_BLOCK_PASS = 55  # multi-scan: per block, per scan (and the output pass)
NS_JPEG_BLOCK_SEQUENTIAL = 30  # one scan, output at reduced size included
NS_JPEG_CODED_BYTE = 18
NS_JPEG_OUTPUT_PIXEL = 5
NS_LOSSLESS_SAMPLE = 6
NS_PNG_CHUNK = 3_000
NS_PNG_RAW_BYTE = 8
NS_INFLATE_BYTE = 4
NS_GIF_STEP = 800
NS_GIF_BYTE = 6
NS_WEBP_PIXEL = 85
NS_WEBP_FRAME = 250
NS_BMP_RLE_CODE = 1_000
NS_BMP_RLE4_PIXEL = 90
NS_BMP_PIXEL = 2
NS_TO_RGB_PIXEL = 4
NS_SIXTEEN_BIT_PIXEL = 8
NS_TRANSFORM_PIXEL = 7
# Memory per unit, in bytes.
JPEG_BLOCK_BYTES = 128  # 64 coefficients of 2 bytes
METADATA_COPIES = 4  # text kept as str at up to 4 bytes a character, next to its bytes
WEBP_CANVAS_BYTES = 16  # libwebp's two RGBA canvases, the frame it hands over and Pillow's image
WEBP_FRAME_BYTES = 200
TO_RGB_TEMPORARY_BYTES = 6  # 16-bit: an int32 copy, the 8-bit result and its L image
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class Cost:
    """One term of a decode's estimated cost, what in the file causes it and how to avoid it."""

    cpu_s: float
    working_bytes: int
    cause: str
    fix: str


def ns(count: float, nanoseconds: float) -> float:
    """Seconds of CPU for `count` units at `nanoseconds` each."""
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
    per_pixel = NS_TRANSFORM_PIXEL + (NS_SIXTEEN_BIT_PIXEL if sixteen else NS_TO_RGB_PIXEL)
    return Cost(
        ns(pixels, per_pixel),
        native + (TO_RGB_TEMPORARY_BYTES * pixels if sixteen else 0),
        f"{size[0]}x{size[1]} decoded {mode} pixels",
        "downscale it",
    )


def metadata_cost(metadata: int, ifd_bytes: int, copied: int, fmt: str) -> Cost:
    """Reading, copying and keeping a file's metadata, and parsing its IFD entries (12 bytes each)."""
    entries = min(65_535, ifd_bytes // 12)
    return Cost(
        ns(entries, NS_IFD_ENTRY) + ns(copied, NS_COPY_BYTE) + ns(metadata, NS_METADATA_BYTE),
        METADATA_COPIES * metadata,
        f"{metadata:,} bytes of metadata",
        f"strip the metadata (EXIF, XMP, ICC, text) from the {fmt}",
    )


# Refusals of structure over a limit, raised by the walkers as soon as a count passes it.


def refuse_metadata(metadata: int, name: str, fmt: str) -> None:
    if metadata > MAX_METADATA_BYTES:
        raise InvalidInputError(
            f"{name}: this {fmt} carries {metadata:,} bytes of metadata (EXIF, XMP, ICC, text), over the "
            f"limit of {MAX_METADATA_BYTES:,}; strip the metadata before sending it"
        )


def refuse_exif(exif: int, name: str, fmt: str) -> None:
    if exif > MAX_EXIF_BYTES:
        raise InvalidInputError(
            f"{name}: this {fmt} carries {exif:,} bytes of EXIF, over the limit of {MAX_EXIF_BYTES:,} (what "
            "one JPEG segment holds); strip the metadata before sending it"
        )


def junk_error(name: str, fmt: str, where: str) -> InvalidInputError:
    return InvalidInputError(
        f"{name}: this {fmt} has more than {MAX_JUNK_BYTES:,} bytes of fill or junk {where}, which Pillow "
        "steps over one at a time; re-save it with a standard encoder"
    )


def refuse_steps(steps: int, what: str, name: str, fmt: str, fix: str) -> None:
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
