"""Untrusted JSON documents parsed within a budget: no body costs much more than its own bytes, none a 500.

Cost model. `json.loads` makes a Python object of every value: a number is a 24-byte float plus an
8-byte list slot, `{}` a 64-byte dict, `[]` a 56-byte list, each from 2-3 bytes of text. So the
64 MiB a body may hold after decompression (CONVSERVE_MAX_UPLOAD_BYTES; a 64 KiB gzip bomb
inflates to it) used to become 1.4-2.2 GB of objects before any check ran. Here:

- Numeric arrays are not parsed. An array that holds no string (numbers, nested lists of them: how a
  tensor is written) of `SPAN_MIN_BYTES` or more, found as the value of an object member or as the
  whole document, is set aside as a `NumericSpan` (a slice of the body, O(1) memory) and left in the
  document as a placeholder: a random 37-digit integer a client cannot guess. `service.transport.tensorjson`
  reads a span into float32 once the consumer knows how many values it may hold.
- The rest, the skeleton, is at most `SKELETON_LIMIT` bytes of text (413 beyond): whatever it
  holds, `json.loads` makes at most ~1.5 MiB of objects from it.
- Nesting: a numeric array at most `MAX_NESTING` deep (400), the skeleton by the parser's recursion
  limit (400).
- Time is linear in the body: each string is found by `bytes.find` (memchr) and matched once by a
  possessive regex, never past the skeleton's remaining budget; the end of an array is found with
  `bytes.find` or NumPy over chunks of at most 128 KiB (O(1) extra memory).
- Syntax inside a span is checked when it is read; a span nobody reads is refused
  (`BoundedJson.check_all_read`), so every accepted body was valid JSON throughout (up to NumPy's
  leniency about numbers, see `service.transport.tensorjson`).
- Integers of any length become floats (beyond float32 -> inf -> refused by the finiteness check);
  NaN/Infinity literals are refused; every failure is a 400/413/422 that says what was wrong.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import BadRequestError, PayloadTooLargeError
from service.textsafety import printable

SKELETON_LIMIT = 64 * 1024
"""Bytes of JSON text a body may hold besides its numeric arrays (a V2 header without data is ~200)."""
SPAN_MIN_BYTES = 4096
"""Numeric arrays shorter than this stay in the skeleton: `json.loads` handles them as cheaply."""
MAX_NESTING = 32
"""Deepest numeric array accepted (a V2 shape has at most 8 dimensions, an image tensor 4)."""

_OPEN, _CLOSE = ord("["), ord("]")
_SCAN_BYTES = 128 * 1024
# A string literal, matched where a quote was found (skipped whole, so brackets inside it are never
# counted), and the `[` when it opens the value of an object member. Possessive: one attempt per
# string, never a retry from inside one (`"\"\"\"...` unterminated was quadratic with `search`).
_STRING_OR_MEMBER_ARRAY = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"(?:[ \t\n\r]*:[ \t\n\r]*(\[))?', re.DOTALL)
_DOCUMENT_ARRAY = re.compile(rb"[ \t\n\r]*(\[)")


@dataclass(frozen=True, eq=False)
class NumericSpan:
    """A JSON array left unparsed: `body[start:end]`, brackets balanced, no string inside."""

    body: bytes
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def __repr__(self) -> str:  # what `brief()` shows when a span stands where something else belongs
        return f"<a JSON array of {self.size} bytes>"


@dataclass(frozen=True)
class BoundedJson:
    """A parsed document whose large numeric arrays are `NumericSpan`s."""

    value: Any
    spans: tuple[NumericSpan, ...]
    what: str

    def check_all_read(self, *read: object) -> None:
        """400 if a numeric array sits anywhere but in `read` (it would be accepted unchecked)."""
        unread = [span for span in self.spans if not any(span is value for value in read)]
        if unread:
            raise BadRequestError(
                f"{self.what} holds {len(unread)} numeric array(s) ({unread[0].size} bytes or more) in "
                "fields this endpoint does not read; send only the documented fields"
            )


def _refuse_constant(name: str) -> float:
    raise BadRequestError(f"the JSON body contains {name}, which is not a number; send finite numbers only")


def _nested_too_deeply(what: str) -> BadRequestError:
    return BadRequestError(f"{what} is nested too deeply; a tensor needs 4 levels")


def loads_json(body: bytes | str, what: str, spans: dict[str, NumericSpan] | None = None) -> Any:
    """Parse JSON (UTF-8) that is already small: 400 for any syntax problem, nesting or NaN/Infinity."""
    placeholders = spans or {}

    def number(text: str) -> Any:
        return placeholders[text] if text in placeholders else float(text)

    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        return json.loads(text, parse_int=number, parse_constant=_refuse_constant)
    except RecursionError:
        raise _nested_too_deeply(what) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequestError(f"{what} is not valid JSON ({printable(str(exc))})") from None


def loads_bounded(body: bytes, what: str, end: int | None = None) -> BoundedJson:
    """Parse the JSON in `body[:end]` with its large numeric arrays set aside (see the module doc)."""
    end = len(body) if end is None else end
    token = str(secrets.randbelow(9 * 10**30) + 10**30)  # 31 digits, never a leading zero
    spans: dict[str, NumericSpan] = {}
    pieces: list[bytes] = []
    kept = size = pos = 0  # body[kept:] is not copied yet; `size` bytes of skeleton are
    document = _DOCUMENT_ARRAY.match(body, 0, end)
    candidate = document.start(1) if document else -1
    while True:
        if candidate >= 0:
            stop = _array_end(body, candidate, end, what)
            if stop is None:
                pos = candidate + 1
            else:
                if stop - candidate >= SPAN_MIN_BYTES:
                    placeholder = f"{token}{len(spans):06d}"
                    pieces += [body[kept:candidate], placeholder.encode()]
                    size += candidate - kept + len(placeholder)
                    spans[placeholder] = NumericSpan(body, candidate, stop)
                    kept = stop
                pos = stop
        # Everything from `kept` to the next string's end is skeleton: never look past its budget.
        window = min(end, pos + SKELETON_LIMIT - size - (pos - kept) + 1)
        if window <= pos:
            raise _skeleton_too_large(what)
        quote = body.find(b'"', pos, window)
        match = _STRING_OR_MEMBER_ARRAY.match(body, quote, window) if quote >= 0 else None
        if match is None:  # no more strings, or an unterminated one: the checks below and json.loads say so
            break
        pos, candidate = match.end(), match.start(1)
    if size + end - kept > SKELETON_LIMIT:
        raise _skeleton_too_large(what)
    pieces.append(body[kept:end])
    return BoundedJson(loads_json(b"".join(pieces), what, spans), tuple(spans.values()), what)


def _skeleton_too_large(what: str) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{what} holds more than {SKELETON_LIMIT} bytes of JSON besides its numeric arrays; send the "
        "tensor as one array of numbers and keep the other fields short"
    )


def _array_end(body: bytes, start: int, end: int, what: str) -> int | None:
    """The index after the `]` closing the `[` at `start`, if no string comes first; else None."""
    quote = body.find(b'"', start, end)
    stop = end if quote < 0 else quote
    close = body.find(b"]", start, stop)
    if close < 0:  # unclosed before the string or the end: every "[" so far is still open
        if body.count(b"[", start, stop) > MAX_NESTING:
            raise _nested_too_deeply(what)
        return None
    if body.find(b"[", start + 1, close) < 0:  # a flat array (V2 `data`): memchr found its end
        return close + 1
    depth, pos, step = 0, start, 4096
    while pos < stop:  # nested: depth over growing chunks, so a small array costs a small scan
        count = min(step, stop - pos)
        step = min(2 * step, _SCAN_BYTES)
        chunk = np.frombuffer(body, np.uint8, count, pos)
        where = np.flatnonzero((chunk == _OPEN) | (chunk == _CLOSE))
        if where.size:
            levels = depth + np.cumsum(np.where(chunk[where] == _OPEN, 1, -1))
            closed = np.flatnonzero(levels == 0)
            before = levels[: closed[0]] if closed.size else levels
            if before.size and int(before.max()) > MAX_NESTING:
                raise _nested_too_deeply(what)
            if closed.size:
                return pos + int(where[closed[0]]) + 1
            depth = int(levels[-1])
        pos += count
    return None
