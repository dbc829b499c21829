"""Waiting in tests for something that will happen: poll a condition, bounded, and say what never did.

A test that sleeps a guessed interval and then asserts is slow when the guess is generous and flaky
when it is not. Polling the condition itself returns as soon as it holds; the bound only decides how
long a broken build takes to fail, so it can be generous.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

DEFAULT_TIMEOUT_S = 30.0
_POLL_INTERVAL_S = 0.01


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """Poll `condition()` until it returns true and return the seconds that took.

    Fails the test (`AssertionError`) with "`what` did not happen within `timeout_s` s" otherwise;
    `what` names the event ("the first request reached the queue"). Exceptions from `condition`
    propagate, so a condition can raise with a better reason (a server that exited, say).
    """
    started = time.monotonic()
    deadline = started + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:g} s")
        time.sleep(_POLL_INTERVAL_S)
    return time.monotonic() - started


async def wait_until_async(
    condition: Callable[[], bool], what: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> float:
    """`wait_until` inside an event loop: polls with `asyncio.sleep`, so the loop's other tasks (the
    ones that make the condition come true) run meanwhile."""
    started = time.monotonic()
    deadline = started + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:g} s")
        await asyncio.sleep(_POLL_INTERVAL_S)
    return time.monotonic() - started
