"""Generated blocks in Markdown files: the text between two marker comments, rewritten from results.

The figures in the docs come from the results JSON through a renderer, never by hand, so they cannot
contradict the measurement. Only the block between the markers is written; the prose around it
belongs to whoever writes the document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class MissingMarkersError(ValueError):
    """The document lacks the markers of its generated block (or has them out of order)."""


def block_between(text: str, start: str, end: str, *, source: str = "the document") -> str:
    """The text between `start` and `end` (newline after `start` excluded); raises if either is missing."""
    begin, finish = text.find(start), text.find(end)
    if begin < 0 or finish < begin + len(start):
        raise MissingMarkersError(
            f"{source} has no generated block: put the line {start!r} and, below it, the line {end!r} "
            "where the generated figures belong"
        )
    return text[begin + len(start) : finish].removeprefix("\n")


def replace_block(document: Path, body: str, start: str, end: str) -> bool:
    """Write `body` between the markers of `document`; True when the file changed.

    Raises `MissingMarkersError` (naming the markers) when they are absent, `FileNotFoundError` when
    the document is."""
    text = document.read_text()
    block_between(text, start, end, source=str(document))
    begin, finish = text.find(start), text.find(end)
    updated = text[: begin + len(start)] + "\n" + body + text[finish:]
    if updated == text:
        return False
    document.write_text(updated)
    return True


def cell(value: Any, digits: int = 1) -> str:
    """A table cell of a generated block: `value` with `digits` decimals if a float, "–" if missing."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
