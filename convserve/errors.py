"""The one error the `convserve` command reports to its user: what is wrong and how to fix it."""

from __future__ import annotations


class UsageError(Exception):
    """A mistake the user can fix (a bad option, file or model): printed as one line, exit status 2."""
