"""Paths of the deployment files, a Compose-aware YAML loader and a lock-file reader, shared by the tests
in this folder."""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU_FILE = REPO_ROOT / "docker-compose.cpu.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "convserve.json"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
HEALTHCHECK_SCRIPT = REPO_ROOT / "deploy" / "healthcheck.py"
REQUIREMENTS_DIR = REPO_ROOT / "requirements"
DEV_LOCK = REQUIREMENTS_DIR / "dev.txt"
SERVE_LOCK = REQUIREMENTS_DIR / "serve.txt"
TRAIN_LOCK = REQUIREMENTS_DIR / "train.txt"

PROMTOOL_MISSING = "promtool is not installed (Debian package `prometheus`; `make tools` installs it)"


class ComposeReset:
    """A value tagged `!reset` in a Compose file: it removes the key from the files merged before it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeOverride:
    """A value tagged `!override`: it replaces, instead of merging with, the earlier files' value."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that knows Compose's merge tags, which plain YAML (and check-jsonschema) reject."""


def _construct_tagged(cls: type[ComposeReset] | type[ComposeOverride]) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> ComposeReset | ComposeOverride:
        if isinstance(node, yaml.MappingNode):
            return cls(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return cls(loader.construct_sequence(node, deep=True))
        return cls(loader.construct_scalar(node))  # type: ignore[arg-type]

    return construct


ComposeLoader.add_constructor("!reset", _construct_tagged(ComposeReset))
ComposeLoader.add_constructor("!override", _construct_tagged(ComposeOverride))


def load_compose(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        document = yaml.load(f, Loader=ComposeLoader)  # a SafeLoader subclass
    assert isinstance(document, dict), f"{path.name} must hold a mapping at the top level"
    return document


def strip_compose_tags(value: Any) -> Any:
    """The document as plain JSON-able data, each tagged value replaced by its content."""
    if isinstance(value, ComposeReset | ComposeOverride):
        return strip_compose_tags(value.value)
    if isinstance(value, dict):
        return {key: strip_compose_tags(item) for key, item in value.items()}
    if isinstance(value, list):
        return [strip_compose_tags(item) for item in value]
    return value


def merge_compose(base: Any, override: Any) -> Any:
    """Compose's merge of two files, for the parts these files use: mappings merge key by key,
    `!reset` deletes, `!override` and everything else replaces."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return strip_compose_tags(override)
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, ComposeReset):
            merged.pop(key, None)
        elif isinstance(value, ComposeOverride) or key not in merged:
            merged[key] = strip_compose_tags(value)
        else:
            merged[key] = merge_compose(merged[key], value)
    return merged


def venv_tool(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH (CI may not activate the venv)."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    return shutil.which(name)


# --- Dockerfile reading ----------------------------------------------------------------------------


@dataclass
class Stage:
    """One build stage: its FROM line and its instructions (continuation lines joined)."""

    base: str
    name: str
    instructions: list[str] = field(default_factory=list)

    def runs(self) -> list[str]:
        return [i.removeprefix("RUN ").strip() for i in self.instructions if i.startswith("RUN ")]

    def index_of(self, needle: str) -> int:
        return next(n for n, instruction in enumerate(self.instructions) if needle in instruction)


def instructions(text: str) -> list[str]:
    """Dockerfile instructions with comments dropped and backslash continuations joined."""
    joined: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return joined


def stages(text: str) -> dict[str, Stage]:
    parsed: dict[str, Stage] = {}
    current: Stage | None = None
    for instruction in instructions(text):
        match = re.match(r"FROM (\S+) AS (\S+)", instruction, flags=re.IGNORECASE)
        if match:
            current = Stage(base=match.group(1), name=match.group(2))
            parsed[current.name] = current
        elif current is not None:
            current.instructions.append(instruction)
    return parsed


def arg_defaults(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.MULTILINE))


# --- lock files (requirements/*.txt) --------------------------------------------------------------


@dataclass(frozen=True)
class LockedPackage:
    """One requirement of a lock file: `name==version`, with the sha256 of each file it may install."""

    name: str  # normalized: lower case, runs of "-_." as one "-"
    version: str
    hashes: tuple[str, ...]


def lock_entries(path: Path) -> dict[str, LockedPackage]:
    """The requirements of a pip lock file (uv or pip-compile output), by normalized name."""
    entries: dict[str, LockedPackage] = {}
    for requirement in _joined_requirement_lines(path.read_text(encoding="utf-8")):
        spec, *options = requirement.split(" --")
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)", spec.split(";")[0].strip())
        assert match, f"{path.name}: {spec!r} is not pinned as name==version; regenerate it with `make lock`"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        hashes = tuple(o.removeprefix("hash=sha256:") for o in options if o.startswith("hash=sha256:"))
        entries[name] = LockedPackage(name, match.group(3), hashes)
    return entries


def _joined_requirement_lines(text: str) -> list[str]:
    """Requirement lines with backslash continuations joined; comments and blank lines dropped."""
    joined: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        joined.append(pending + line)
        pending = ""
    return joined
