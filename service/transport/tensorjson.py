"""JSON arrays of numbers -> float32 tensors, shape first: nothing is allocated before the consumer
knows the values fit.

`nested_numbers(value, what, max_lists)` gives the shape of a rectangular nested list of numbers,
read from its brackets and first row alone, and a `read()` that fills a float32 array of that shape.
The consumer compares the shape with what the model accepts (and with its row budget) in between.

Cost model, for a `NumericSpan` (a large array left unparsed by `service.transport.jsonparse`):
- Shape, before any number is parsed: a flat array's length is its commas + 1 (`bytes.count`, C
  speed, in 8 MiB pieces so the GIL is never held for long). A nested one's `[` are counted first
  (NumPy over 128 KiB chunks, nothing kept) and refused past `max_lists`, the lists the largest
  acceptable tensor has; then each bracket's position and direction are kept (5 bytes; ~10 per
  innermost list) and must form the bracket sequence of a rectangular array whose widths the first
  row gives, with exactly as many commas as that shape implies (a longer or shorter row is refused
  here, not reported as a wrong shape).
- Values: each innermost list (or each <= 1 MiB piece of a flat one) is parsed by `np.fromstring`
  (C, no Python object per number) straight into the preallocated float32 array, which it must fill
  exactly; the text between lists must be brackets, one comma and whitespace.
- Peak: the body + the float32 tensor + ~10-20 bytes per innermost list (under 1/6 of the tensor
  for rows of 32 numbers, 1/40 for 224) + ~4 MiB; measured on 64 MiB bodies: the tensor + 5-7 MiB.
  Time: linear in the body, with the GIL released between calls on at most 1 MiB of text (the
  longest stall measured: 12 ms, against 1.5 s inside one `json.loads` of a 95 MB body).
- NumPy's number parser is a little more lenient than JSON (`+1`, `.5`, `01`, `nan`, `inf`);
  non-finite values are refused by the predictor's finiteness check, the others are harmless.
A value `json.loads` already parsed (a small array in the skeleton, at most 64 KiB of text) goes
through `np.asarray` as before, but must hold numbers only (no strings or booleans).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InvalidInputError
from service.transport.jsonparse import NumericSpan

_OPEN, _CLOSE = ord("["), ord("]")
_SCAN_BYTES = 128 * 1024
_TEXT_CHUNK = 1 << 20
"""Most number text parsed in one `np.fromstring` call (a value longer than this is refused)."""
_COUNT_BYTES = 8 << 20
_ROWS_PER_BLOCK = 4096
_JSON_SPACE = b" \t\n\r"


@dataclass(frozen=True)
class NestedNumbers:
    """A rectangular nested list of numbers whose shape is known; `read()` parses it into float32."""

    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


def _not_numbers(what: str) -> InvalidInputError:
    return InvalidInputError(f"{what} must be a rectangular nested list of numbers")


def nested_numbers(value: Any, what: str, max_lists: int) -> NestedNumbers:
    """The shape of `value` (a span or a parsed JSON value) as a rectangular array of numbers; 422 if
    it is not one or holds more than `max_lists` lists."""
    if isinstance(value, NumericSpan):
        return _span_numbers(value, what, max_lists)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):  # ragged, or more than 64 dimensions
        raise _not_numbers(what) from None
    # parse_int made every JSON number a float: any other kind is strings, booleans or objects
    if array.dtype.kind != "f" and array.size:
        raise _not_numbers(what)

    def read() -> np.ndarray:
        with np.errstate(over="ignore"):  # beyond float32 -> inf, refused by the finiteness check
            return array.astype(np.float32)

    return NestedNumbers(array.shape, read)


def _span_numbers(span: NumericSpan, what: str, max_lists: int) -> NestedNumbers:
    body, start, end = span.body, span.start, span.end
    if body.find(b"[", start + 1, end) < 0:  # flat: count separators (C speed) before anything else
        count = 1 + _count(body, b",", start, end)
        flat = np.array([start]), np.array([end - 1])
        return NestedNumbers((count,), lambda: _read_rows(span, *flat, (count,), what))
    positions, steps = _brackets(span, 2 * max_lists, what)
    shape = _rectangular_shape(body, positions, steps, what)
    # Each innermost list holds width - 1 commas, and one comma separates each from the next: a
    # row longer or shorter than the first is refused here, before its wrong shape is reported.
    if _count(body, b",", start, end) != math.prod(shape) - 1:
        raise InvalidInputError(
            f"{what} must be a rectangular nested list of numbers; its innermost lists are not all "
            f"{shape[-1]} long like its first"
        )
    inner = (steps[:-1] > 0) & (steps[1:] < 0)  # "[" then "]": an innermost list
    opens, closes = positions[:-1][inner], positions[1:][inner]
    return NestedNumbers(shape, lambda: _read_rows(span, opens, closes, shape, what))


def _count(body: bytes, byte: bytes, start: int, end: int) -> int:
    """`body.count(byte, start, end)` in 8 MiB pieces: one count over 64 MiB would hold the GIL (so
    the event loop) for ~50 ms."""
    return sum(body.count(byte, pos, min(pos + _COUNT_BYTES, end)) for pos in range(start, end, _COUNT_BYTES))


def _brackets(span: NumericSpan, limit: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the span's brackets and +1 (`[`) / -1 (`]`) for each; 422 past `limit` of them."""
    chunks = range(span.start, span.end, _SCAN_BYTES)

    def chunk(pos: int) -> np.ndarray:
        return np.frombuffer(span.body, np.uint8, min(_SCAN_BYTES, span.end - pos), pos)

    # Counted before anything is allocated: a flood of "[]" is refused at the cost of a scan.
    total = 2 * sum(int(np.count_nonzero(chunk(pos) == _OPEN)) for pos in chunks)
    if total > limit:
        raise InvalidInputError(
            f"{what} holds more than {limit // 2} nested lists, more than the largest tensor it may "
            "hold has; check its shape, and send at most CONVSERVE_MAX_QUEUE_SIZE rows"
        )
    positions = np.empty(total, np.int32 if span.end < 2**31 else np.int64)
    steps = np.empty(total, np.int8)
    filled = 0
    for pos in chunks:
        data = chunk(pos)
        where = np.flatnonzero((data == _OPEN) | (data == _CLOSE))
        if filled + where.size > total:  # more "]" than "[": not the balanced array the scan found
            raise _not_numbers(what)
        positions[filled : filled + where.size] = where + pos
        steps[filled : filled + where.size] = np.where(data[where] == _OPEN, 1, -1)
        filled += where.size
    return positions[:filled], steps[:filled]


def _rectangular_shape(body: bytes, positions: np.ndarray, steps: np.ndarray, what: str) -> tuple[int, ...]:
    """The shape the first row of each level implies, if every list agrees with it; else 422."""
    levels = np.cumsum(steps, dtype=np.int8)  # depth after each bracket (at most MAX_NESTING)
    ndim = int(np.argmax(steps < 0))  # the brackets opened before the first close
    dims = []
    for level in range(1, ndim):  # children of the first list at each level
        first = level - 1
        closing = first + 1 + int(np.argmax(levels[first + 1 :] == level - 1))
        inside = slice(first + 1, closing)
        dims.append(int(np.count_nonzero((steps[inside] > 0) & (levels[inside] == level + 1))))
    width = _row_width(body, int(positions[ndim - 1]) + 1, int(positions[ndim]), what)
    lists = sum(math.prod(dims[:i]) for i in range(ndim))
    if 2 * lists != steps.size or not np.array_equal(steps, _bracket_steps(dims)):
        raise InvalidInputError(
            f"{what} must be a rectangular nested list of numbers; its lists differ in length or depth "
            f"from its first row, {[*dims, width]}"
        )
    return (*dims, width)


def _row_width(body: bytes, start: int, end: int, what: str) -> int:
    """How many numbers the first innermost list holds (parsed, so a stray comma is not a number)."""
    if end - start > _TEXT_CHUNK:  # too long to be a row of any model: its length is all that matters
        return body.count(b",", start, end) + 1
    row = np.empty(body.count(b",", start, end) + 1, np.float32)
    _parse_into(body, start, end, row, what)
    return row.size


def _bracket_steps(dims: list[int]) -> np.ndarray:
    """The bracket sequence of a rectangular array whose lists have `dims` children (innermost last)."""
    steps = np.array([1, -1], np.int8)  # an innermost list
    for count in reversed(dims):
        steps = np.concatenate([[1], np.tile(steps, count), [-1]]).astype(np.int8)
    return steps


def _expect(text: bytes, expected: bytes, what: str) -> None:
    """`text` without whitespace must be `expected` (the brackets and commas between number lists)."""
    if text.translate(None, _JSON_SPACE) != expected:
        raise _not_numbers(what)


def _read_rows(
    span: NumericSpan, opens: np.ndarray, closes: np.ndarray, shape: tuple[int, ...], what: str
) -> np.ndarray:
    """Every innermost list into a float32 array of `shape`, checking the text between them."""
    body, ndim, width = span.body, len(shape), shape[-1]
    out = np.empty(math.prod(shape), np.float32)
    _expect(body[span.start : int(opens[0]) + 1], b"[" * ndim, what)
    _expect(body[int(closes[-1]) : span.end], b"]" * ndim, what)
    previous = -1
    for first in range(0, opens.size, _ROWS_PER_BLOCK):  # Python ints for one block at a time
        rows = slice(first, first + _ROWS_PER_BLOCK)
        block = zip(opens[rows].tolist(), closes[rows].tolist(), strict=True)
        for row, (open_, close) in enumerate(block, first):
            # Between two lists: closing brackets, one comma, opening brackets (their counts were
            # checked with the bracket sequence).
            if (
                previous >= 0
                and body[previous:open_].translate(None, _JSON_SPACE).lstrip(b"]").rstrip(b"[") != b","
            ):
                raise _not_numbers(what)
            _parse_into(body, open_ + 1, close, out[row * width : (row + 1) * width], what)
            previous = close + 1
    return out.reshape(shape)


def _parse_into(body: bytes, start: int, end: int, out: np.ndarray, what: str) -> None:
    """Parse the comma-separated numbers in `body[start:end]` into `out`, which they must fill exactly."""
    filled = 0
    while True:
        cut = end if end - start <= _TEXT_CHUNK else body.rfind(b",", start, start + _TEXT_CHUNK)
        if cut < 0:
            raise InvalidInputError(f"{what} holds a value of more than {_TEXT_CHUNK} bytes of text")
        text = body[start:cut]
        stripped = text.rstrip(_JSON_SPACE)
        # fromstring accepts a trailing comma and reads blank text as -1: refuse both (JSON does).
        if not stripped or stripped[-1] == ord(","):
            raise _not_numbers(what)
        try:
            values = np.fromstring(text, dtype=np.float32, sep=",")
        except ValueError:
            raise _not_numbers(what) from None
        if filled + values.size > out.size:
            raise _not_numbers(what)
        out[filled : filled + values.size] = values
        filled += values.size
        if cut == end:
            break
        start = cut + 1
    if filled != out.size:
        raise _not_numbers(what)
