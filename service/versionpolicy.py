"""Which versions of a model to serve, in Triton's vocabulary: `latest`, `latest:N`, `all`, `specific:V,...`.

A module of its own, below the settings (which parse it from CONVSERVE_VERSION_POLICY at start-up)
and the model registry (which applies it to the versions on disk).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve: the newest `latest` ones, `specific` ones, or all."""

    latest: int | None = 1
    specific: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest`, `latest:N`, `all` or `specific:V[,V...]`; `ValueError` naming the forms otherwise."""
        kind, _, argument = text.strip().lower().partition(":")
        try:
            if kind == "all" and not argument:
                return cls(latest=None)
            if kind == "latest":
                count = int(argument) if argument else 1
                if count >= 1:
                    return cls(latest=count)
            if kind == "specific":
                versions = tuple(sorted({int(part) for part in argument.split(",") if part.strip()}))
                if versions and versions[0] >= 1:
                    return cls(latest=None, specific=versions)
        except ValueError:
            pass
        raise ValueError(
            f"version policy {text!r} is not one of latest, latest:N, all, specific:V[,V...] "
            "(N and V positive integers)"
        )

    def select(self, versions: list[int]) -> list[int]:
        """The versions to serve among `versions` (ascending)."""
        if self.specific:
            return [v for v in versions if v in self.specific]
        if self.latest is None:
            return list(versions)
        return list(versions[-self.latest :])

    def __str__(self) -> str:
        if self.specific:
            return "specific:" + ",".join(map(str, self.specific))
        return "all" if self.latest is None else f"latest:{self.latest}"
