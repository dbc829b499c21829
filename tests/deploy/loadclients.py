"""Clients that keep the service busy while it is stopped, for the `docker stop` / `docker compose stop`
under load tests: each posts the cat photo in a loop, every request with its own id."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

import httpx

from tests.photos import jpeg
from tests.waiting import wait_until

LOAD_CLIENTS = 6
# The service's one line per request (service/transport/middleware.py), for the load clients' request ids.
ACCESS_LINE = r"request_id=(load-\d+-\d+) method=POST path=/predict status=(\d+)"


def access_line(prefix: str) -> str:
    """The access log line of a request made by a `LoadClient` with this prefix."""
    return rf"request_id=({prefix}-\d+-\d+) method=POST path=/predict status=(\d+)"


class LoadClient(threading.Thread):
    """Posts the cat photo over one keep-alive connection until the server stops taking connections."""

    def __init__(self, number: int, url: str, prefix: str = "load") -> None:
        super().__init__(daemon=True, name=f"{prefix}-{number}")
        self.number, self.url, self.prefix = number, url, prefix
        self.outcomes: dict[str, Any] = {}  # request id -> status code or the transport error

    def run(self) -> None:
        cat = jpeg("chelsea")
        with httpx.Client(timeout=120) as client:
            for sequence in range(100_000):
                request_id = f"{self.prefix}-{self.number}-{sequence}"
                try:
                    response = client.post(
                        f"{self.url}/predict",
                        files={"file": ("c.jpg", cat, "image/jpeg")},
                        headers={"X-Request-ID": request_id},
                    )
                except httpx.TransportError as exc:
                    self.outcomes[request_id] = exc
                    return  # the server closed the connection or refuses new ones: it is stopping
                self.outcomes[request_id] = response.status_code


@dataclass(frozen=True)
class DrainOutcome:
    """What became of the load clients' requests across a shutdown, from the service's log and theirs."""

    admitted: dict[str, str]
    """Request id -> status, for every request the service logged other than a refusal."""
    refused: list[str]
    """Logged with 503: refused at the door once draining began (the body had not fully arrived, or
    the queue was closed); never accepted, so the client may retry it elsewhere."""
    lost: dict[str, Any]
    """Request id -> what the client got, where that is not what the service answered: an admitted
    request without its 200, or a refusal whose 503 never reached the client."""
    never_logged: list[str]
    """Sent by a client but absent from the log: the connection was refused or closed first."""


def drain_outcome(log: str, clients: list[LoadClient], pattern: str = ACCESS_LINE) -> DrainOutcome:
    logged = dict(re.findall(pattern, log))
    outcomes = {rid: outcome for client in clients for rid, outcome in client.outcomes.items()}
    admitted = {rid: status for rid, status in logged.items() if status != "503"}
    refused = [rid for rid, status in logged.items() if status == "503"]
    lost = {rid: outcomes.get(rid) for rid in admitted if outcomes.get(rid) != 200}
    lost.update({rid: outcomes.get(rid) for rid in refused if outcomes.get(rid) != 503})
    never_logged = [rid for rid in outcomes if rid not in logged]
    return DrainOutcome(admitted, refused, lost, never_logged)


def steady_load(url: str, prefix: str = "load") -> list[LoadClient]:
    """`LOAD_CLIENTS` clients started, returned once each has had two answers (all in their loop)."""
    clients = [LoadClient(n, url, prefix) for n in range(LOAD_CLIENTS)]
    for client in clients:
        client.start()
    wait_until(
        lambda: all(sum(o == 200 for o in c.outcomes.values()) >= 2 for c in clients),
        "answers to every load client",
        120,
    )
    return clients
