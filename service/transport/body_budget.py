"""How many bytes of request bodies one worker holds at once, across every request.

Each request's body is bounded by MAX_UPLOAD_BYTES, but nothing bounded their sum: MAX_CONNECTIONS
clients each sending a body up to the limit could make a worker hold tens of GB before any of them
was refused. The budget counts every body byte a request has received until that request ends (the
bytes, or what they were parsed into, live that long), and a chunk that would take the total past
MAX_BODY_BYTES_IN_FLIGHT gets its request a 503 with `Retry-After`, so memory is shed like a full
queue is: before the work, with a status that tells a client to come back.
"""

from __future__ import annotations

from service.errors import ServiceUnavailableError


class BodyBudgetError(ServiceUnavailableError):
    """The worker holds MAX_BODY_BYTES_IN_FLIGHT of request bodies already."""

    reject_reason = "body_memory"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class BodyBudget:
    """Body bytes held by requests in progress; used on the event loop only, so no lock."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0

    def take(self, size: int) -> None:
        """Count `size` more bytes, or raise `BodyBudgetError` (nothing counted) if they do not fit."""
        if self.held_bytes + size > self.limit_bytes:
            raise BodyBudgetError(
                f"the server holds {self.held_bytes} bytes of request bodies already, and this one would "
                f"pass CONVSERVE_MAX_BODY_BYTES_IN_FLIGHT ({self.limit_bytes}); retry shortly"
            )
        self.held_bytes += size

    def give(self, size: int) -> None:
        """Return `size` bytes a finished request held."""
        self.held_bytes -= size
