"""Print the requirements of convserve's extras, read from pyproject.toml, one per line (pip -r format).

Used by the Dockerfile's `requirements` stage: the install layers are keyed on these lists instead of the
whole pyproject.toml, so edits to anything else in it (dev tools, linters, the version) keep the ~1 GB
dependency layers cached. Standard library only: it runs on the bare build base.

    python requirements.py pyproject.toml serve > serve.txt
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject_text: str, extras: list[str]) -> list[str]:
    """The base dependencies plus those of each extra, in order, without duplicates."""
    project = tomllib.loads(pyproject_text)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml defines {sorted(optional)}")
    listed = list(project.get("dependencies", []))
    for extra in extras:
        listed += optional[extra]
    return list(dict.fromkeys(listed))


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python requirements.py PYPROJECT_TOML EXTRA [EXTRA ...]")
    with open(sys.argv[1], encoding="utf-8") as file:
        text = file.read()
    print("\n".join(requirements(text, sys.argv[2:])))


if __name__ == "__main__":
    main()
