"""The checkable claims of README.md and docs/*.md hold against the code they describe.

What is checked: the configuration page is what `docs/generate.py` writes from `Settings` now; every
setting, metric and `python -m` module named exists; every path in backticks exists in the
repository (API routes against the app's routes); every `make X` is a Makefile target; links stay
inside the repository and resolve; the README stays short; no issue numbers, commit hashes or
machine diaries. Each test lists everything wrong at once.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from service.app import create_app
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
DOCS_DIR = REPO_ROOT / "docs"
README_MAX_LINES = 320

# Paths the docs name that are made at run time, not kept in the repository (fnmatch patterns).
GENERATED_PATHS = (
    "models",  # the model repository: built by `make serve` / `python -m training`, git-ignored
    "./models",
    "models/*",
    "photos/*",  # the reader's own image folder in the training examples
    ".venv/*",  # made by the Makefile
    ".env",  # the reader's copy of .env.example
    "model.onnx",  # files of one model version, written by the exporter
    "metrics.json",
    "config.json",
    "quantize.json",
    "training.png",
    "checkpoint.pt",
)
# Absolute paths inside the container or the pod, not routes of the API (fnmatch patterns).
CONTAINER_PATHS = (
    "/tmp",
    "/app/models",
    "/models",
    "/opt/convserve/*",
    "/run/secrets/*",
    "/var/run/secrets/*",
)
# Links to outside the repository: none. Mention outside resources in plain text instead.
ALLOWED_EXTERNAL_LINKS: frozenset[str] = frozenset()
# Top-level packages whose `python -m` modules are checked.
REPO_PACKAGES = ("service", "training", "benchmarks", "modelcontract", "tests", "docs")

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_MIME = re.compile(r"^(application|multipart|text|image|audio|video)/[\w.+-]+$")
_DOMAIN_KEY = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)*\.(com|io|org|net|dev|k8s\.io)/")
_PATH_SUFFIXES = (".py", ".yml", ".yaml", ".md", ".json")


@dataclass(frozen=True)
class Doc:
    path: Path
    text: str

    @property
    def name(self) -> str:
        return str(self.path.relative_to(REPO_ROOT))

    @property
    def prose(self) -> str:
        """The text without fenced code blocks."""
        return _FENCE.sub("", self.text)

    @property
    def code(self) -> list[str]:
        """Fenced code blocks and inline code spans."""
        return [m.group(0) for m in _FENCE.finditer(self.text)] + _CODE_SPAN.findall(self.prose)


@cache
def documents() -> tuple[Doc, ...]:
    paths = [README, *sorted(DOCS_DIR.glob("*.md"))]
    return tuple(Doc(path, path.read_text(encoding="utf-8")) for path in paths)


def report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what}:\n  " + "\n  ".join(problems)


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- settings and metrics -----------------------------------------------------------------------


def test_configuration_page_is_what_the_generator_writes() -> None:
    expected = load_generator().render()
    current = (DOCS_DIR / "configuration.md").read_text(encoding="utf-8")
    assert current == expected, (
        "docs/configuration.md differs from what docs/generate.py writes from service/settings.py; "
        "run `.venv/bin/python docs/generate.py` (make docs)"
    )


def test_the_cli_page_shows_the_convserve_help_as_the_command_prints_it() -> None:
    generator = load_generator()
    current = (DOCS_DIR / "cli.md").read_text(encoding="utf-8")
    assert current == generator.render_cli_doc(current), (
        "docs/cli.md's `convserve --help` block differs from what the command prints; run "
        "`.venv/bin/python docs/generate.py` (make docs)"
    )
    for words in generator.CLI_COMMANDS:
        assert f"$ convserve {' '.join((*words, '--help'))}" in current


def test_every_setting_has_its_variable_on_the_configuration_page() -> None:
    page = (DOCS_DIR / "configuration.md").read_text(encoding="utf-8")
    missing = [f"CONVSERVE_{name.upper()}" for name in Settings.model_fields]
    missing = [variable for variable in missing if f"`{variable}`" not in page]
    assert not missing, report(missing, "settings missing from docs/configuration.md")


def test_every_variable_the_docs_name_is_a_setting() -> None:
    known = {f"CONVSERVE_{name.upper()}" for name in Settings.model_fields}

    def exists(variable: str) -> bool:  # `CONVSERVE_TLS_*` names a family of settings
        if variable.endswith("*"):
            return any(name.startswith(variable.rstrip("*")) for name in known)
        return variable in known

    problems = [
        f"{doc.name}: {variable}"
        for doc in documents()
        for variable in sorted(set(re.findall(r"\bCONVSERVE_[A-Z0-9_]*[A-Z0-9](?:_\*)?", doc.text)))
        if not exists(variable)
    ]
    assert not problems, report(problems, "CONVSERVE_* variables that are not settings")


def metric_names() -> list[str]:
    source = (REPO_ROOT / "service" / "metrics.py").read_text(encoding="utf-8")
    return sorted(set(re.findall(r'"(convserve_[a-z0-9_]+)"', source)))


def test_every_metric_is_documented() -> None:
    names = metric_names()
    assert len(names) >= 10, f"expected the service's metric names in service/metrics.py, found {names}"
    text = "\n".join(doc.text for doc in documents())
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, report(missing, "metrics of service/metrics.py missing from README.md and docs/")


def test_every_metric_the_docs_name_exists() -> None:
    names = set(metric_names())
    derived = ("_bucket", "_sum", "_count", "_mean", "_created")  # series and adapter metrics built on them
    problems = [
        f"{doc.name}: {name}"
        for doc in documents()
        for name in sorted(set(re.findall(r"\bconvserve_[a-z0-9_]*[a-z0-9]", doc.text)))
        if name not in names and not any(name.endswith(s) and name[: -len(s)] in names for s in derived)
    ]
    assert not problems, report(problems, "convserve_* metric names that service/metrics.py does not define")


# ---- paths, routes, modules, make targets ---------------------------------------------------------


def looks_like_path(span: str) -> bool:
    if any(ch.isspace() for ch in span) or ":" in span or "=" in span:
        return False  # commands, URLs, image references, assignments
    if _MIME.match(span) or _DOMAIN_KEY.match(span):
        return False
    return "/" in span or span.endswith(_PATH_SUFFIXES)


def expand(path: str) -> list[str]:
    """`a.{json,md}` -> `a.json`, `a.md`; `/x[/y]/z` -> `/x/z`, `/x/y/z`."""
    brace = re.search(r"\{([^{}]*,[^{}]*)\}", path)
    if brace:
        return [
            variant
            for option in brace.group(1).split(",")
            for variant in expand(path[: brace.start()] + option + path[brace.end() :])
        ]
    optional = re.search(r"\[([^\[\]]*)\]", path)
    if optional:
        return expand(path[: optional.start()] + path[optional.end() :]) + expand(
            path[: optional.start()] + optional.group(1) + path[optional.end() :]
        )
    return [path]


@cache
def route_templates() -> tuple[str, ...]:
    """Every route of the app, FastAPI's docs included, as templates with `{}` for parameters."""
    app = create_app(Settings(providers=["cpu"], model_repository=Path("models")))
    paths = set(app.openapi()["paths"]) | {route.path for route in app.routes if hasattr(route, "path")}
    return tuple(sorted(re.sub(r"\{[^}]*\}", "{}", path) for path in paths))


def is_route(path: str) -> bool:
    normalized = re.sub(r"\{[^}]*\}|<[^>]*>", "{}", path.split("?", maxsplit=1)[0])
    for marker in ("…", "...", "*"):
        if marker in normalized:
            prefix = normalized.split(marker)[0]
            return any(template.startswith(prefix) for template in route_templates())
    return normalized in route_templates()


@cache
def repository_file_names() -> frozenset[str]:
    skip = {".venv", ".git", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
    names = set()
    for path in REPO_ROOT.rglob("*"):
        parts = path.relative_to(REPO_ROOT).parts
        if not skip.intersection(parts) and parts[0] != "models":  # models/ is generated
            names.add(path.name)
    return frozenset(names)


def path_problem(span: str, doc: Doc) -> str | None:
    for path in expand(span):
        if path.startswith("/"):
            if not any(fnmatch.fnmatch(path, pattern) for pattern in CONTAINER_PATHS) and not is_route(path):
                return f"{doc.name}: `{span}` is neither an API route nor a known container path"
            continue
        if any(fnmatch.fnmatch(path, pattern) for pattern in GENERATED_PATHS):
            continue
        fixed = re.split(r"<|\{|…|\.\.\.|\*", path)[0]  # up to the first placeholder
        if fixed != path:
            fixed = fixed.rsplit("/", 1)[0] if "/" in fixed else ""
        if not fixed:
            continue
        if "/" not in fixed and fixed in repository_file_names():
            continue  # a bare file name, in a table row or sentence that says where it lives
        if not (REPO_ROOT / fixed).exists() and not (doc.path.parent / fixed).exists():
            return f"{doc.name}: `{span}` does not exist in the repository"
    return None


def test_paths_in_backticks_exist() -> None:
    problems = [
        problem
        for doc in documents()
        for span in _CODE_SPAN.findall(doc.prose)
        if looks_like_path(span) and (problem := path_problem(span, doc))
    ]
    assert not problems, report(problems, "paths in the docs that do not exist")


def test_python_modules_named_exist() -> None:
    problems = []
    for doc in documents():
        for block in doc.code:
            for module in re.findall(r"(?:^|\s)-m\s+([A-Za-z_][\w.]*)", block):
                if module.split(".")[0] not in REPO_PACKAGES:
                    continue
                base = REPO_ROOT.joinpath(*module.split("."))
                if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
                    problems.append(f"{doc.name}: python -m {module}")
    assert not problems, report(sorted(set(problems)), "`python -m` modules that do not exist")


def makefile_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    targets: set[str] = set()
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.\- ]+):(?!=)", line)
        if match and not line.startswith(("\t", "#")):
            targets.update(match.group(1).split())
    return targets


def test_make_targets_named_exist() -> None:
    targets = makefile_targets()
    problems = sorted(
        {
            f"{doc.name}: make {target}"
            for doc in documents()
            for block in doc.code
            for target in re.findall(r"(?:^|[\s;&|(])make\s+([a-z][\w-]*)", block, re.MULTILINE)
            if target not in targets
        }
    )
    assert not problems, report(problems, f"make targets the Makefile does not have ({sorted(targets)})")


# ---- links -----------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path: Path) -> set[str]:
    prose = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", prose, re.MULTILINE)}


def links(doc: Doc) -> Iterator[str]:
    prose = _CODE_SPAN.sub("", doc.prose)
    yield from re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)
    yield from re.findall(r"<(https?://[^>]+)>", prose)
    yield from re.findall(r"(?<![(<])\b(https?://\S+)", prose)


def test_links_stay_inside_the_repository_and_resolve() -> None:
    problems = []
    for doc in documents():
        for target in links(doc):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                if target not in ALLOWED_EXTERNAL_LINKS:
                    problems.append(f"{doc.name}: {target} leaves the repository; mention it in plain text")
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (doc.path.parent / file_part).resolve() if file_part else doc.path
            if not resolved.exists():
                problems.append(f"{doc.name}: {target} does not resolve")
            elif not resolved.is_relative_to(REPO_ROOT):
                problems.append(f"{doc.name}: {target} points outside the repository")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{doc.name}: {target} names no heading of {resolved.name}")
    assert not problems, report(problems, "bad links")


def test_readme_links_every_docs_page() -> None:
    linked = {Path(target.partition("#")[0]).name for target in links(documents()[0])}
    missing = [path.name for path in sorted(DOCS_DIR.glob("*.md")) if path.name not in linked]
    assert not missing, report(missing, "docs pages the README does not link")


# ---- shape and hygiene -------------------------------------------------------------------------------


def test_readme_reads_in_ten_minutes() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it under {README_MAX_LINES}"


def test_performance_page_has_the_generated_block_markers() -> None:
    text = (DOCS_DIR / "performance.md").read_text(encoding="utf-8")
    start, end = "<!-- generated: performance -->", "<!-- end generated: performance -->"
    assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end), (
        f"docs/performance.md must hold one {start} ... {end} block for the benchmark report"
    )


_FORBIDDEN = (
    (re.compile(r"\bissues?\s*#?\s*\d+\b", re.IGNORECASE), "an issue number"),
    (re.compile(r"(?<![\w&/])#\d+\b"), "an issue or pull-request number"),
    (re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b"), "a commit hash"),
    (
        re.compile(r"\b(this|the current|our) CI machine|\bthese machines\b|\bon this machine\b", re.I),
        "a diary",
    ),
    (re.compile(r"\.\./shared/"), "a path outside the repository"),
)


@pytest.mark.parametrize("doc", documents(), ids=lambda doc: doc.name)
def test_no_issue_numbers_commit_hashes_or_diary(doc: Doc) -> None:
    problems = []
    for number, line in enumerate(doc.text.splitlines(), start=1):
        for pattern, what in _FORBIDDEN:
            for match in pattern.finditer(line):
                problems.append(f"{doc.name}:{number}: {what}: {match.group(0)!r}")
    assert not problems, report(problems, "lines that belong in a commit message, not the docs")
