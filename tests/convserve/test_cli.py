"""The installed `convserve` script: help, import, serve, predict (HTTP and gRPC), train, mistakes."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from convserve.cli import main
from tests.convserve.graphs import classifier, save
from tests.liveserver import REPO_ROOT, ServiceProcess, process_env, service_process
from tests.photos import encode, photo

SCRIPT = shutil.which("convserve", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(
    SCRIPT is None, reason="the convserve script is not installed: run `.venv/bin/pip install --no-deps -e .`"
)
LABELS = ("red", "green", "blue")
OPTIONS = {
    None: ["serve", "import", "predict", "train"],
    "serve": ["--repository", "--host", "--port", "--grpc-port", "--workers", "docs/configuration.md"],
    "import": [
        "--name", "--labels", "--repository", "--mean", "--std", "--size", "--resize", "--interpolation",
        "--layout", "--output", "--sample", "imagenet", "inception", "none", "--logits-output",
        "--embedding-output", "--embedding-normalized",
    ],
    "predict": ["FILE", "--url", "--model", "--top-k", "--token", "--grpc", "http://localhost:8000"],
}  # fmt: skip


def convserve(*arguments: str | Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    assert SCRIPT is not None
    return subprocess.run(
        [SCRIPT, *map(str, arguments)],
        cwd=cwd,
        env=process_env({}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("command", list(OPTIONS), ids=lambda c: c or "convserve")
def test_help_lists_every_option(command: str | None) -> None:
    result = convserve(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    for option in OPTIONS[command]:
        assert option in result.stdout, (option, result.stdout)
    if command in ("serve", "import", "predict"):
        assert result.stdout.count("default") >= 4, result.stdout


def test_bad_option_exits_2_with_a_message() -> None:
    result = convserve("import", "m.onnx", "--name", "x", "--labels", "l.txt", "--layout", "chw")
    assert result.returncode == 2
    assert "argument --layout: invalid choice: 'chw'" in result.stderr
    result = convserve("predict", "photo.jpg", "--top-k", "0")
    assert result.returncode == 2 and "expected a positive integer, got 0" in result.stderr


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding one model imported with the command: an NHWC graph with a fixed batch of 1."""
    work = tmp_path_factory.mktemp("import")
    model = save(classifier(layout="nhwc", batch=1, seed=5), work / "keras.onnx")
    labels = work / "labels.txt"
    labels.write_text("\n".join(LABELS))
    root = work / "models"
    result = convserve("import", model, "--name", "colours", "--labels", labels, "--repository", root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"imported {model} as 'colours' version 1: {root}/colours/1/model.onnx")
    assert "from NHWC, 3 labels, logits, fixed batch of 1" in result.stdout
    return root


def test_import_mistake_is_one_line_and_exit_2(tmp_path: Path, repository: Path) -> None:
    labels = tmp_path / "two.txt"
    labels.write_text("yes\nno\n")
    model = save(classifier(), tmp_path / "m.onnx")
    result = convserve("import", model, "--name", "colours", "--labels", labels, "--repository", repository)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("convserve import: error: ") and "outputs 3 classes but" in result.stderr
    assert sorted(p.name for p in (repository / "colours").iterdir()) == ["1"]


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """`convserve serve` in a subprocess; its repository comes from --repository alone (the working
    directory's ./models, the default, holds other models)."""
    log = tmp_path_factory.mktemp("serve") / "service.log"
    env = {"CONVSERVE_PROVIDERS": "cpu", "CONVSERVE_MAX_BATCH_SIZE": "4"}

    def command(port: int) -> list[str]:
        assert SCRIPT is not None
        return [SCRIPT, "serve", "--repository", str(repository), "--port", str(port), "--workers", "1"]

    with service_process(env, log_path=log, command=command) as process:
        yield process


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee", "astronaut"):
        paths.append(folder / f"{name}.png")
        paths[-1].write_bytes(encode(photo(name), "PNG"))
    return paths


def _top_k(stdout: str, photos: list[Path], k: int) -> dict[str, list[str]]:
    """Each file's prediction lines, checked to be the k best in order."""
    blocks: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if not line.startswith(" "):
            blocks[line.removesuffix(":")] = []
        else:
            blocks[list(blocks)[-1]].append(line.strip())
    assert list(blocks) == [str(path) for path in photos], stdout
    for lines in blocks.values():
        assert [line.split(".")[0] for line in lines] == [str(rank) for rank in range(1, k + 1)]
        scores = [float(line.split()[1]) for line in lines]
        assert scores == sorted(scores, reverse=True)
        assert {line.split()[2] for line in lines} <= set(LABELS)
    return blocks


def test_predict_prints_the_top_k_of_every_file(server: ServiceProcess, photos: list[Path]) -> None:
    result = convserve("predict", *photos, "--url", server.url, "--top-k", "2")
    assert result.returncode == 0, result.stderr + server.log()
    _top_k(result.stdout, photos, 2)


def test_predict_over_grpc_agrees_with_http(server: ServiceProcess, photos: list[Path]) -> None:
    http = convserve("predict", *photos, "--url", server.url, "--top-k", "3", "--model", "colours")
    grpc = convserve(
        "predict", *photos, "--grpc", "--url", server.grpc_url, "--top-k", "3", "--model", "colours"
    )
    assert grpc.returncode == 0, grpc.stderr + server.log()
    http_blocks, grpc_blocks = _top_k(http.stdout, photos, 3), _top_k(grpc.stdout, photos, 3)
    for path in photos:  # same classes in the same order; scores printed to 4 decimals
        assert [line.split()[2] for line in grpc_blocks[str(path)]] == [
            line.split()[2] for line in http_blocks[str(path)]
        ]


def test_a_server_refusal_prints_the_servers_message_and_exits_1(
    server: ServiceProcess, photos: list[Path]
) -> None:
    result = convserve("predict", photos[0], "--url", server.url, "--top-k", "7")
    assert result.returncode == 1
    assert "HTTP 422: top_k must be between 1 and 3 (the class count), got 7" in result.stderr
    result = convserve("predict", photos[0], "--grpc", "--url", server.grpc_url, "--model", "nope")
    assert result.returncode == 1 and "gRPC NOT_FOUND" in result.stderr and "nope" in result.stderr


def test_predict_without_a_server_says_it_cannot_reach_it(photos: list[Path]) -> None:
    result = convserve("predict", photos[0], "--url", "http://127.0.0.1:9")
    assert result.returncode == 1 and "cannot reach http://127.0.0.1:9" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="delegation needs torch installed")
def test_train_delegates_to_the_training_cli() -> None:
    result = convserve("train", "--help")
    direct = subprocess.run(
        [sys.executable, "-m", "training", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and result.stdout == direct.stdout


def test_train_without_torch_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = importlib.util.find_spec

    def without_torch(name: str, package: str | None = None) -> object:
        return None if name == "torch" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without_torch)  # an install without the train extra
    assert main(["train", "fit", "--data", "photos"]) == 2
    assert "pip install 'convserve[train]'" in capsys.readouterr().err


def run_fresh(code: str) -> subprocess.CompletedProcess[str]:
    """`code` in a new interpreter at the repository root: what it imports is what the command loads."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def test_import_and_predict_never_load_torch_or_training(tmp_path: Path) -> None:
    model = save(classifier(), tmp_path / "m.onnx")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS))
    arguments = ["import", str(model), "--name", "m", "--labels", str(labels), "--repository", str(tmp_path)]
    code = (
        "import sys\n"
        "from convserve.cli import main\n"
        f"status = main({arguments!r})\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'training'))\n"
        "assert not loaded, loaded\n"
        "sys.exit(status)\n"
    )
    result = run_fresh(code)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "1" / "model.onnx").is_file()


@pytest.mark.parametrize("command", [[], ["import"], ["serve"], ["predict"]])
def test_help_loads_neither_onnx_nor_onnx_runtime(command: list[str]) -> None:
    # The help is read before any model exists; it must not pay for the libraries that act on one.
    code = (
        "import sys\n"
        "from convserve.cli import main\n"
        "try:\n"
        f"    main({[*command, '--help']!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'torch'))\n"
        "assert not loaded, loaded\n"
    )
    result = run_fresh(code)
    assert result.returncode == 0, result.stderr
