"""Imported models, served: the server's answer equals the original file run directly.

Each foreign model is imported with `convserve import`'s library call, then served by a real server;
several real photos go in one request, and the top-1 and scores must match ONNX Runtime running the
original file (its own layout, no convserve code) on preprocessing written here from the definition:
shorter side resized, center crop, [0, 1] scaling, mean/std.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from PIL import Image

from convserve.importer import ImportRequest, import_model
from service.models.runtime import warmup_sizes
from service.state import ServiceState
from tests.convserve.graphs import classifier, save
from tests.liveserver import LiveServer, live_server
from tests.photos import encode, photo
from tests.service.promtext import metric
from tests.tinymodel import tiny_settings

PHOTOS = ("chelsea", "coffee", "astronaut")
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
SCORE_TOLERANCE = 2e-3
MAX_BATCH_SIZE = 4


@dataclass(frozen=True)
class Case:
    name: str
    original: Path
    labels: tuple[str, ...]
    layout: str
    size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    probabilities: bool
    options: dict[str, str | int | None]
    """ImportRequest fields beyond model, name, labels and repository."""


def export_torchvision(path: Path) -> Path:
    """A seeded, untrained torchvision SqueezeNet 1.1 (5 classes, 64x64), exported with torch's own
    exporter under its own input and output names, as a user would."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(weights=None, num_classes=5).eval()
    torch.onnx.export(
        model,
        (torch.rand(2, 3, 64, 64),),
        str(path),
        input_names=["pixel_values"],
        output_names=["scores"],
        opset_version=18,
        dynamo=True,
        external_data=False,
        dynamic_shapes=({0: "batch"},),
        optimize=False,
        verbose=False,
    )
    return path


def _cases(root: Path) -> list[Case]:
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    none = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    three = ("red", "green", "blue")
    return [
        Case("squeezenet", export_torchvision(root / "squeezenet.onnx"), ("a", "b", "c", "d", "e"),
             "nchw", 64, 73, "bilinear", *imagenet, False, {}),
        Case("keras_nhwc", save(classifier(layout="nhwc", seed=1), root / "nhwc.onnx"), three,
             "nhwc", 24, 30, "bicubic", *half, False,
             {"layout": "nhwc", "mean": "inception", "resize": 30, "interpolation": "bicubic"}),
        Case("batch_of_one", save(classifier(batch=1, seed=2), root / "batch1.onnx"), three,
             "nchw", 24, 27, "bilinear", *none, False, {"mean": "none"}),
        Case("batch_of_two", save(classifier(batch=2, layout="nhwc", seed=3), root / "batch2.onnx"), three,
             "nhwc", 24, 27, "bilinear", *imagenet, False, {}),
        Case("softmaxed", save(classifier(size=None, softmax=True, seed=4), root / "softmax.onnx"), three,
             "nchw", 20, 24, "bilinear", (0.4, 0.45, 0.5), (0.25, 0.25, 0.25), True,
             {"size": 20, "resize": 24, "mean": "0.4,0.45,0.5", "std": "0.25,0.25,0.25"}),
    ]  # fmt: skip


@dataclass(frozen=True)
class Served:
    live: LiveServer
    cases: list[Case]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Every case imported into one repository, served by one live server."""
    work = tmp_path_factory.mktemp("originals")
    repository = tmp_path_factory.mktemp("models")
    cases = _cases(work)
    for case in cases:
        labels = work / f"{case.name}.txt"
        labels.write_text("\n".join(case.labels) + "\n")
        request = ImportRequest(model=case.original, name=case.name, labels=labels, repository=repository)
        import_model(ImportRequest(**{**request.__dict__, **case.options}))
    with live_server(tiny_settings(repository, max_batch_size=MAX_BATCH_SIZE)) as live:
        yield Served(live, cases)


def service_state_of(live: LiveServer) -> ServiceState:
    state: ServiceState = live.app.state.convserve
    return state


def reference_input(image: Image.Image, case: Case) -> np.ndarray:
    """The photo as the original model expects it, computed from the definition (not convserve's code)."""
    width, height = image.size
    scale = case.resize / min(width, height)
    resized_size = (
        (case.resize, int(height * scale)) if width <= height else (int(width * scale), case.resize)
    )
    resized = np.asarray(image.resize(resized_size, FILTERS[case.interpolation]), dtype=np.float32) / 255
    top = round((resized.shape[0] - case.size) / 2)
    left = round((resized.shape[1] - case.size) / 2)
    crop = resized[top : top + case.size, left : left + case.size]
    normalized = (crop - np.asarray(case.mean, np.float32)) / np.asarray(case.std, np.float32)
    return normalized if case.layout == "nhwc" else normalized.transpose(2, 0, 1)


def reference_scores(case: Case) -> np.ndarray:
    """The original file's class probabilities for every photo, one photo per run (any fixed batch
    padded with copies of it)."""
    session = ort.InferenceSession(str(case.original), providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0].shape[0]
    rows = []
    for name in PHOTOS:
        single = reference_input(photo(name), case)[None]
        batch = np.repeat(single, declared if isinstance(declared, int) else 1, axis=0)
        (outputs,) = session.run(None, {session.get_inputs()[0].name: batch})
        rows.append(outputs[0].astype(np.float64))
    scores = np.stack(rows)
    if case.probabilities:
        return scores
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def served_scores(live: LiveServer, case: Case) -> np.ndarray:
    """The server's probabilities for every photo, all photos in one `/predict` request (PNG, lossless)."""
    files = [("image", (f"{name}.png", encode(photo(name), "PNG"), "image/png")) for name in PHOTOS]
    response = httpx.post(
        f"{live.url}/predict", params={"model": case.name, "top_k": len(case.labels)}, files=files, timeout=60
    )
    assert response.status_code == 200, response.text
    scores = np.zeros((len(PHOTOS), len(case.labels)))
    for row, predictions in enumerate(response.json()["predictions"]):
        for prediction in predictions:
            assert prediction["label"] == case.labels[prediction["index"]]
            scores[row, prediction["index"]] = prediction["score"]
    return scores


@pytest.mark.parametrize("name", ["squeezenet", "keras_nhwc", "batch_of_one", "batch_of_two", "softmaxed"])
def test_imported_model_serves_what_the_original_file_computes(served: Served, name: str) -> None:
    case = next(case for case in served.cases if case.name == name)
    expected = reference_scores(case)
    answered = served_scores(served.live, case)
    np.testing.assert_allclose(answered, expected, atol=SCORE_TOLERANCE)
    assert list(answered.argmax(axis=1)) == list(expected.argmax(axis=1))
    np.testing.assert_allclose(answered.sum(axis=1), 1.0, atol=1e-5)  # scores are probabilities either way


@pytest.mark.parametrize(("name", "largest"), [("batch_of_one", 1), ("batch_of_two", 2), ("squeezenet", 4)])
def test_a_fixed_batch_caps_the_batches_the_server_forms(served: Served, name: str, largest: int) -> None:
    case = next(case for case in served.cases if case.name == name)
    loaded = service_state_of(served.live).registry.resolve(name, None)
    assert loaded.model.batch_limit(MAX_BATCH_SIZE) == largest
    assert warmup_sizes(loaded.model, MAX_BATCH_SIZE) == ((largest,) if largest < MAX_BATCH_SIZE else (1, 4))
    served_scores(served.live, case)  # three photos in one request
    text = httpx.get(f"{served.live.url}/metrics").text
    selector = f'{{model="{name}"}}'
    batches = metric(text, f"convserve_batch_size_count{selector}")
    assert batches >= 1
    within = metric(text, f'convserve_batch_size_bucket{{model="{name}",le="{float(largest)}"}}')
    assert within == batches  # no batch was larger than the graph takes
    if largest == 1:
        assert metric(text, f"convserve_batch_size_sum{selector}") == batches  # every photo its own batch
