"""Client-supplied text made safe to log and to echo: no control characters, bounded length."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
MAX_ECHOED_CHARS = 200


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, limit: int = MAX_ECHOED_CHARS) -> str:
    """`text` with control and bidi-override characters escaped (`\\x0a`), cut to `limit` chars."""
    escaped = _CONTROL.sub(_escape, text)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def brief(value: object) -> str:
    """A short, printable description of a client-sent JSON value for an error message."""
    if isinstance(value, list | dict) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    return printable(repr(value))
