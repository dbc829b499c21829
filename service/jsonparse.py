"""Untrusted JSON: parsed into numbers without a 500 for any input a client can send.

Integers of any length become floats (beyond float32 they become inf, which the tensor checks
refuse), NaN/Infinity literals are refused, nesting is bounded by the parser's recursion limit, and
every failure is a 400/422 that says what was wrong.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from service.errors import BadRequestError, InvalidInputError
from service.textsafety import printable


def _refuse_constant(name: str) -> float:
    raise BadRequestError(f"the JSON body contains {name}, which is not a number; send finite numbers only")


def loads_json(body: bytes, what: str) -> Any:
    """Parse untrusted JSON: 400 for any syntax problem, excessive nesting or non-standard constants."""
    try:
        return json.loads(body, parse_int=float, parse_constant=_refuse_constant)
    except RecursionError:
        raise BadRequestError(f"{what} is nested too deeply; a tensor needs 4 levels") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequestError(f"{what} is not valid JSON ({printable(str(exc))})") from None


def json_numbers(values: Any, what: str) -> np.ndarray:
    """A nested list of JSON numbers as float32; 422 if it is ragged or holds anything else."""
    try:
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused by the finiteness check
            array = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInputError(
            f"{what} must be a rectangular nested list of numbers ({printable(str(exc))[:200]})"
        ) from None
    return array
