"""The BentoML peer without BentoML: its model code on the tiny model, its venv's pins and commands, and
its rows and ratios in the report.

BentoML itself lives only in the peer's venv (`make peers`), which `make test` does not build; the
real peer is checked by hand with `tests/benchmarks/check_bento_peer.py`.
"""

from __future__ import annotations

import ast
import io
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from benchmarks.peers import peer_venv
from benchmarks.peers.onnx_classifier import DRAFT_MARGIN, TOP_K, OnnxClassifier, answer, ranked
from benchmarks.performance.report import SERVERS, peer_ratios, render_markdown
from benchmarks.performance.targets import check_targets
from service.inference import preprocessing
from service.inference.preprocessing import ImagePreprocessor
from tests.photos import jpeg, large_jpeg, photo
from tests.tinymodel import TINY_LABELS, export_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> OnnxClassifier:
    return OnnxClassifier.load(export_tiny_model(tmp_path_factory.mktemp("repo")))


@pytest.mark.parametrize("data", [jpeg("coffee"), large_jpeg("chelsea")], ids=["small", "drafted"])
def test_peer_feeds_the_model_what_the_service_computes(classifier: OnnxClassifier, data: bytes) -> None:
    # Same preprocessing quality and cost: the service's draft decode and the contract's transform.
    expected = ImagePreprocessor(classifier.transform)(data)
    actual = classifier.inputs([Image.open(io.BytesIO(data))])
    assert actual.shape == (1, *expected.shape)
    np.testing.assert_array_equal(actual[0], expected)


def test_peer_decodes_a_large_jpeg_at_reduced_size_with_the_service_margin(
    classifier: OnnxClassifier,
) -> None:
    assert DRAFT_MARGIN == preprocessing.DRAFT_MARGIN
    image = Image.open(io.BytesIO(large_jpeg("chelsea")))
    full_size = image.size
    decoded, source_size = classifier.decode(image)
    assert source_size == full_size
    assert decoded.mode == "RGB" and decoded.width < full_size[0]
    assert min(decoded.size) >= DRAFT_MARGIN * classifier.metadata.eval_spec.resize_size


def test_peer_answers_each_image_of_a_batch_like_the_service(classifier: OnnxClassifier) -> None:
    images = [photo(name) for name in ("chelsea", "coffee", "astronaut")]
    batched = classifier.classify(images)
    alone = [classifier.classify([image])[0] for image in images]
    assert [[p["index"] for p in row] for row in batched] == [[p["index"] for p in row] for row in alone]
    for row in batched:
        assert len(row) == min(TOP_K, len(TINY_LABELS))
        assert [p["label"] for p in row] == [TINY_LABELS[p["index"]] for p in row]
        scores = [p["score"] for p in row]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-6)  # all three classes of the tiny model
    body = answer(batched[0], classifier.model)
    assert body == {"model": {"name": "tiny", "version": 1}, "predictions": [batched[0]]}


def test_ranked_keeps_the_top_k_best_first_and_ties_in_class_order() -> None:
    probabilities = np.array([[0.1, 0.3, 0.3, 0.05, 0.05, 0.1, 0.1]])
    (row,) = ranked(probabilities, list("abcdefg"), top_k=5)
    assert [p["index"] for p in row] == [1, 2, 0, 5, 6]
    assert [p["label"] for p in row] == ["b", "c", "a", "f", "g"]


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", text, flags=re.MULTILINE))


def test_peer_runs_the_model_libraries_the_project_locks() -> None:
    peer = _pins(peer_venv.REQUIREMENTS.read_text())
    lock = _pins((REPO_ROOT / "requirements" / "serve.txt").read_text())
    assert peer["bentoml"]
    assert peer["numpy"] == lock["numpy"]
    assert peer["pillow"] == lock["pillow"]
    # The peer serves on the CPU: the same ONNX Runtime release, without the CUDA provider.
    assert peer["onnxruntime"] == lock["onnxruntime-gpu"]


def test_venv_is_built_in_one_resolution_then_checked(tmp_path: Path) -> None:
    venv = tmp_path / "peer"
    commands = peer_venv.build_commands(venv, peer_venv.REQUIREMENTS, python="/usr/bin/python3")
    assert commands[0] == ["/usr/bin/python3", "-m", "venv", str(venv)]
    install, check = commands[1], commands[2]
    assert install[:4] == [str(venv / "bin" / "python"), "-m", "pip", "install"]
    assert install[-2:] == ["-r", str(peer_venv.REQUIREMENTS)]
    assert check == [str(venv / "bin" / "python"), "-m", "pip", "check"]


def test_venv_is_current_only_when_built_from_the_present_pins(tmp_path: Path) -> None:
    venv, requirements = tmp_path / "peer", tmp_path / "requirements.txt"
    requirements.write_text("bentoml==1.0\n")
    assert not peer_venv.is_current(venv, requirements)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / peer_venv.STAMP).write_text("bentoml==1.0\n")
    assert peer_venv.is_current(venv, requirements)
    requirements.write_text("bentoml==1.1\n")
    assert not peer_venv.is_current(venv, requirements)


def test_serve_command_and_env_name_the_service_the_model_and_a_private_home(tmp_path: Path) -> None:
    venv = tmp_path / "peer"
    command = peer_venv.serve_command(venv, "127.0.0.1", 8123)
    assert command == [
        str(venv / "bin" / "bentoml"),
        "serve",
        "benchmarks.peers.bento_service:ImageClassifier",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
    ]
    module, _, _ = peer_venv.SERVICE.partition(":")
    assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file()
    env = peer_venv.serve_env(Path("models/m/1/model.onnx"), tmp_path / "home", repo_root=REPO_ROOT)
    assert env[peer_venv.MODEL_FILE_VARIABLE] == str(Path("models/m/1/model.onnx").resolve())
    assert env["PYTHONPATH"] == str(REPO_ROOT)
    assert env["BENTOML_HOME"] == str(tmp_path / "home")


def _imports(*paths: Path) -> set[str]:
    """Every module the files import (`import a.b`, `from a.b import c`: `a.b`)."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
    return names


def test_peer_modules_import_nothing_the_peer_venv_lacks() -> None:
    # The peer's venv has BentoML, ONNX Runtime, Pillow and numpy, and the repository on its path: the
    # peer may import modelcontract and its own modules, never torch, the service or training.
    peers = REPO_ROOT / "benchmarks" / "peers"
    modules = [peers / f"{name}.py" for name in ("bento_service", "onnx_classifier", "peer_venv")]
    contract = sorted((REPO_ROOT / "modelcontract").glob("*.py"))
    allowed = {"bentoml", "numpy", "onnxruntime", "PIL", "modelcontract", "__future__"}
    own = {"benchmarks.peers.onnx_classifier", "benchmarks.peers.peer_venv"}
    for name in _imports(*modules, *contract) - own:
        top = name.partition(".")[0]
        assert top in allowed or top in sys.stdlib_module_names, name


def _row(server: str, level: int, img_per_s: float, p50: float, p99: float) -> dict[str, Any]:
    return {
        "server": server,
        "mode": "concurrency",
        "level": level,
        "img_per_s": img_per_s,
        "ok": 100,
        "errors": 0,
        "error_kinds": {},
        "p50_ms": p50,
        "p95_ms": p99 * 0.9,
        "p99_ms": p99,
        "mean_batch_size": None,
        "server_cpu_percent": 180.0,
    }


LEVELS = [
    _row("service", 1, 90.0, 11.0, 14.0),
    _row("service", 32, 120.0, 250.0, 400.0),
    _row("naive", 1, 15.0, 60.0, 70.0),
    _row("naive", 32, 20.0, 1500.0, 2300.0),
    _row("bento", 1, 100.0, 10.0, 12.6),
    _row("bento", 32, 80.0, 380.0, 800.0),
]


def test_peer_ratios_are_the_service_over_each_peer_at_1_and_32_clients() -> None:
    ratios = peer_ratios(LEVELS)
    assert ratios["service/bento@c1"] == {"img_per_s": 0.9, "p50_ms": 1.1, "p99_ms": 1.111}
    assert ratios["service/bento@c32"] == {"img_per_s": 1.5, "p50_ms": 0.658, "p99_ms": 0.5}
    assert ratios["service/naive@c32"] == {"img_per_s": 6.0, "p50_ms": 0.167, "p99_ms": 0.174}
    assert set(ratios) == {"service/bento@c1", "service/bento@c32", "service/naive@c1", "service/naive@c32"}
    assert peer_ratios([row for row in LEVELS if row["server"] != "bento"]).keys() == {
        "service/naive@c1",
        "service/naive@c32",
    }


def test_the_peer_targets_read_the_ratios_and_the_per_core_row() -> None:
    levels = [*LEVELS, _row("instances", 32, 125.0, 240.0, 390.0)]
    targets = {t["key"]: t for t in check_targets({"peer_ratios": peer_ratios(levels), "levels": levels})}
    met = {key: targets[key]["met"] for key in targets if key.startswith(("peer_", "ratio_service_per_core"))}
    # c=1: 0.9x the img/s and 1.1x the p50 (both missed); c=32: 1.5x and half the p99 (met);
    # 120 / 125 of the per-core row (missed).
    assert met == {
        "peer_c1_img_per_s": False,
        "peer_c1_p50_ms": False,
        "peer_c32_img_per_s": True,
        "peer_c32_p99_ms": True,
        "ratio_service_per_core": False,
    }
    assert targets["ratio_service_per_core"]["measured"] == 0.96
    unmeasured = {t["key"]: t["met"] for t in check_targets({"peer_ratios": {}, "levels": []})}
    assert {unmeasured[key] for key in met} == {None}


def _results(levels: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "created": "2025-01-02T03:04:05+00:00",
        "mode": "quick",
        "command": "python -m benchmarks --quick --servers service,naive,bento",
        "output": "/tmp/results.json",
        "duration_s": 100.0,
        "in_process": {},
        "levels": levels,
        "model": {"name": "imagenet", "version": 1},
        "corpus": {"count": 8, "megapixels_min": 0.3, "megapixels_max": 1.9},
        "machine": {"cpu_model": "Test CPU", "logical_cpus": 2},
        "targets": [],
    }


def test_report_puts_the_peer_in_every_table_and_the_ratios_first() -> None:
    markdown = render_markdown(_results(LEVELS))
    assert "bento" in SERVERS
    assert "| BentoML 1.4 with adaptive batching, same ONNX file and preprocessing | 80.0 |" in markdown
    assert "| 32 | 120.0 (400) | 20.0 (2300) | 80.0 (800) |" in markdown
    assert "| BentoML | 1 | 0.90 | 1.10 | 1.11 |" in markdown
    assert "| BentoML | 32 | 1.50 | 0.66 | 0.50 |" in markdown
    assert "| naive | 32 | 6.00 | 0.17 | 0.17 |" in markdown
    assert markdown.index("| convserve / |") < markdown.index("| Concurrency |")


def test_report_without_the_peer_has_no_ratio_table() -> None:
    # Results from before the peer existed render as they did, so committed docs stay as generated.
    markdown = render_markdown(_results([row for row in LEVELS if row["server"] != "bento"]))
    assert "| convserve / |" not in markdown
