"""`convserve import --embedding-output`: a foreign classifier declares an embedding, from a graph output
or any intermediate tensor, and the service serves it.

The tiny graphs end in GlobalAveragePool -> Flatten -> Gemm, the head of a model-zoo ResNet; a user
names the pool's [N, 4, 1, 1] output (flattened on import), the Flatten's [N, 4], or an output the
exporter already made. Every published file is loaded by the service's own `load_model`, which checks
the declared outputs and their ranks as it does at startup.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from convserve.cli import main
from convserve.importer import ImportedModel, import_model
from service.inference.preprocessing import ImagePreprocessor
from service.models.runtime import load_model
from tests.convserve.graphs import FILTERS, classifier, save, with_nodes, with_unit_embedding
from tests.convserve.test_import_refusals import refused, request
from tests.liveserver import LiveServer, live_server
from tests.photos import encode, jpeg, photo
from tests.tinymodel import tiny_settings

ADMIN = "admin-0123456789abcdef"


def outputs_of(path: Path) -> dict[str, list[int | str]]:
    """The published graph's outputs with their declared dims."""
    graph = onnx.load(str(path)).graph
    return {
        value.name: [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
        for value in graph.output
    }


def served_embedding(imported: ImportedModel, batch: np.ndarray) -> np.ndarray:
    """The embedding rows the service's own runtime fetches from the published file."""
    model = load_model(imported.path, ["CPUExecutionProvider"])
    name = imported.metadata.embedding_output
    assert name is not None
    _, extra = model.run(batch, {name})
    return extra[name]


def features_of(model: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    """The original graph's `features` tensor (the Flatten before the Gemm) on ONNX Runtime."""
    exposed = with_nodes(model, [], {"features": [None, FILTERS]})
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    (features,) = session.run(["features"], {"images": batch})
    return np.asarray(features)


def random_batch(rows: int = 3) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((rows, 3, 24, 24)).astype(np.float32)


# ---- what gets declared -------------------------------------------------------------------------------


def test_the_pooled_map_is_flattened_into_a_new_output(tmp_path: Path, labels: Path) -> None:
    original = classifier()
    imported = import_model(request(tmp_path, original, labels, embedding_output="pooled"))
    metadata = imported.metadata
    assert (metadata.embedding_output, metadata.embedding_size) == ("pooled_flat", FILTERS)
    assert metadata.embedding_normalized is False  # ReLU features, far from unit length
    assert outputs_of(imported.path) == {"class_scores": ["N", 3], "pooled_flat": ["N", FILTERS]}
    flatten = onnx.load(str(imported.path)).graph.node[-1]
    assert (flatten.op_type, list(flatten.input)) == ("Flatten", ["pooled"])
    batch = random_batch()
    np.testing.assert_allclose(served_embedding(imported, batch), features_of(original, batch), rtol=1e-6)
    assert imported.embedding is not None and imported.embedding.flattened


def test_the_flatten_output_is_served_under_its_own_name_with_no_node_added(
    tmp_path: Path, labels: Path
) -> None:
    original = classifier(seed=1)
    imported = import_model(request(tmp_path, original, labels, embedding_output="features"))
    assert (imported.metadata.embedding_output, imported.metadata.embedding_size) == ("features", FILTERS)
    assert outputs_of(imported.path) == {"class_scores": ["N", 3], "features": ["N", FILTERS]}
    assert len(onnx.load(str(imported.path)).graph.node) == len(original.graph.node)
    batch = random_batch()
    np.testing.assert_allclose(served_embedding(imported, batch), features_of(original, batch), rtol=1e-6)


def test_an_exported_unit_embedding_output_is_found_normalized_unless_told_otherwise(
    tmp_path: Path, labels: Path
) -> None:
    model = with_unit_embedding(classifier())
    found = import_model(request(tmp_path, model, labels, embedding_output="embedding"))
    told = import_model(
        request(tmp_path, model, labels, embedding_output="embedding", embedding_normalized="no")
    )
    yes = import_model(
        request(tmp_path, model, labels, embedding_output="embedding", embedding_normalized="yes")
    )
    assert (found.metadata.embedding_normalized, told.metadata.embedding_normalized) == (True, False)
    assert yes.metadata.embedding_normalized is True
    assert outputs_of(found.path) == {"class_scores": ["N", 3], "embedding": ["N", FILTERS]}
    rows = served_embedding(found, random_batch())
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


def test_logits_output_picks_the_scores_among_several_and_the_rest_are_dropped(
    tmp_path: Path, labels: Path
) -> None:
    model = with_nodes(with_unit_embedding(classifier()), [], {"relu": ["N", FILTERS, 24, 24]})
    imported = import_model(
        request(tmp_path, model, labels, embedding_output="embedding", logits_output="class_scores")
    )
    assert outputs_of(imported.path) == {"class_scores": ["N", 3], "embedding": ["N", FILTERS]}
    # A rank-4 pooled output the exporter declared is replaced by its flattened form.
    pooled = with_nodes(classifier(), [], {"pooled": ["N", FILTERS, 1, 1]})
    imported = import_model(request(tmp_path, pooled, labels, embedding_output="pooled"))
    assert outputs_of(imported.path) == {"class_scores": ["N", 3], "pooled_flat": ["N", FILTERS]}


@pytest.mark.parametrize(("layout", "batch"), [("nhwc", 1), ("nchw", 2)])
def test_a_fixed_batch_or_nhwc_graph_declares_its_embedding_like_its_scores(
    tmp_path: Path, labels: Path, layout: str, batch: int
) -> None:
    imported = import_model(
        request(tmp_path, classifier(layout=layout, batch=batch), labels, embedding_output="pooled")
    )
    assert outputs_of(imported.path)["pooled_flat"] == [batch, FILTERS]
    assert served_embedding(imported, random_batch(batch)).shape == (batch, FILTERS)


def test_without_embedding_output_nothing_changes(tmp_path: Path, labels: Path) -> None:
    imported = import_model(request(tmp_path, classifier(), labels))
    assert not imported.metadata.has_embedding and imported.embedding is None
    assert list(outputs_of(imported.path)) == ["class_scores"]


def test_the_summary_line_names_the_embedding(
    tmp_path: Path, labels: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save(classifier(), tmp_path / "model.onnx")
    arguments = ["import", str(model), "--name", "m", "--labels", str(labels), "--repository", str(tmp_path)]
    assert main([*arguments, "--embedding-output", "pooled"]) == 0
    assert (
        "embedding 'pooled_flat' of 4 (not normalized, flattened from 'pooled'))" in capsys.readouterr().out
    )


# ---- refusals -------------------------------------------------------------------------------------------

_PROBE = "probe"


def _head_tensor(node: onnx.NodeProto, *weights: onnx.TensorProto) -> onnx.ModelProto:
    """The classifier with one more tensor `probe` computed from its head (consumed by nothing)."""
    return with_nodes(classifier(), [node], weights=list(weights))


_AXES = numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
_NAN = numpy_helper.from_array(np.array([np.nan], dtype=np.float32), "nan")
_ONE_ROW = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "one_row")

EMBEDDING_REFUSALS = {
    "unknown-name": (
        classifier(),
        {"embedding_output": "penultimate"},
        r"'penultimate': .* has no such tensor; tensors that look like pooled features: 'pooled', 'features'",
    ),
    "feature-map": (
        classifier(),
        {"embedding_output": "relu"},
        r"'relu' is a feature map \[N, 4, 24, 24\]; expected float32 features \[N, D\], or \[N, D, 1, 1\]",
    ),
    "rank-3": (
        _head_tensor(helper.make_node("Unsqueeze", ["features", "axes"], [_PROBE]), _AXES),
        {"embedding_output": _PROBE},
        r"'probe' is of rank 3 \[N, 4, 1\]; expected float32 features \[N, D\]",
    ),
    "float16": (
        _head_tensor(helper.make_node("Cast", ["features"], [_PROBE], to=TensorProto.FLOAT16)),
        {"embedding_output": _PROBE},
        r"'probe' is float16 \[N, 4\]; expected float32",
    ),
    "batch-of-one": (
        _head_tensor(helper.make_node("Reshape", ["features", "one_row"], [_PROBE]), _ONE_ROW),
        {"embedding_output": _PROBE},
        r"'probe' \[1, \w+\] has its batch axis fixed to 1 while the class scores' batch is dynamic",
    ),
    "a-weight": (classifier(), {"embedding_output": "conv_w"}, r"'conv_w' is a weight of .*, not computed"),
    "the-input": (classifier(), {"embedding_output": "images"}, r"'images' is the graph's input"),
    "only-output": (
        classifier(),
        {"embedding_output": "class_scores"},
        r"only output 'class_scores' is the one --embedding-output names",
    ),
    "not-unit": (
        classifier(),
        {"embedding_output": "features", "embedding_normalized": "yes"},
        r"--embedding-normalized yes, but .* L2 norms from [\d.]+ to [\d.]+, not 1",
    ),
    "normalized-alone": (
        classifier(),
        {"embedding_normalized": "no"},
        r"--embedding-normalized no goes with --embedding-output NAME",
    ),
    "several-outputs": (
        with_nodes(classifier(), [], {"relu": ["N", FILTERS, 24, 24]}),
        {"embedding_output": "features"},
        r"has 2 outputs \('class_scores', 'relu'\); pass --logits-output NAME",
    ),
    "several-outputs-without-embedding": (
        with_nodes(classifier(), [], {"relu": ["N", FILTERS, 24, 24]}),
        {},
        r"has 2 outputs \('class_scores', 'relu'\).*remove the others when exporting",
    ),
    "unknown-logits": (
        with_unit_embedding(classifier()),
        {"embedding_output": "embedding", "logits_output": "scores"},
        r"--logits-output 'scores': .* has no such output; its outputs: 'class_scores', 'embedding'",
    ),
    "nan-embedding": (
        _head_tensor(helper.make_node("Mul", ["features", "nan"], [_PROBE]), _NAN),
        {"embedding_output": _PROBE},
        r"--embedding-output 'probe' holds NaN or infinite values for a real picture",
    ),
}


@pytest.mark.parametrize(
    ("model", "options", "expected"), list(EMBEDDING_REFUSALS.values()), ids=list(EMBEDDING_REFUSALS)
)
def test_import_refuses_an_embedding_it_cannot_serve(
    tmp_path: Path, labels: Path, model: onnx.ModelProto, options: dict[str, object], expected: str
) -> None:
    message = refused(tmp_path, model, labels, **options)
    assert re.search(expected, message), message


# ---- served -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    live: LiveServer
    imported: ImportedModel
    original: onnx.ModelProto


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A classifier imported with its pooled map as the embedding (`pooled`), and one without (`plain`),
    served with galleries on."""
    work = tmp_path_factory.mktemp("embedding-import")
    labels = work / "labels.txt"
    labels.write_text("red\ngreen\nblue\n")
    original = classifier(seed=3)
    repository = work / "models"
    imported = import_model(
        request(work, original, labels, name="pooled", repository=repository, embedding_output="pooled")
    )
    import_model(request(work, classifier(seed=4), labels, name="plain", repository=repository))
    settings = tiny_settings(repository, gallery_dir=work / "galleries", admin_token=ADMIN, gallery_k=2)
    with live_server(settings) as live:
        yield Served(live, imported, original)


def test_the_served_embedding_is_the_original_graphs_pooled_features_at_unit_length(served: Served) -> None:
    files = [encode(photo(name), "PNG") for name in ("chelsea", "coffee", "astronaut")]
    uploads = [("image", (f"{index}.png", data, "image/png")) for index, data in enumerate(files)]
    url = f"{served.live.url}/predict"
    answers = [
        httpx.post(url, params={"model": "pooled", "embedding": "true"}, files=uploads, timeout=60)
        for _ in range(2)
    ]
    assert all(answer.status_code == 200 for answer in answers), answers[0].text
    rows = np.asarray(answers[0].json()["embeddings"], dtype=np.float32)
    assert rows.shape == (len(files), FILTERS)
    assert answers[1].json()["embeddings"] == answers[0].json()["embeddings"]
    preprocess = ImagePreprocessor.from_metadata(served.imported.metadata)
    features = features_of(served.original, np.stack([preprocess(data) for data in files]))
    expected = features / np.linalg.norm(features, axis=1, keepdims=True)
    np.testing.assert_allclose(rows, expected, atol=1e-5)
    plain = httpx.post(url, params={"model": "plain", "embedding": "true"}, files=uploads[:1], timeout=60)
    assert 400 <= plain.status_code < 500 and "embedding" in plain.json()["error"]


def test_a_gallery_answers_from_the_imported_embedding(served: Served) -> None:
    gallery = "/v1/models/pooled/gallery"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=served.live.url, timeout=60) as client:
        for label, name in (("cat", "chelsea"), ("cup", "coffee")):
            files = [("image", (f"{q}.jpg", jpeg(name, quality=q), "image/jpeg")) for q in (90, 50)]
            added = client.post(gallery, files=files, data={"label": label}, headers=admin)
            assert added.status_code == 201, added.text
        query = {"image": ("q.jpg", jpeg("chelsea", quality=75), "image/jpeg")}
        answer = client.post(
            "/predict", params={"model": "pooled", "mode": "gallery", "top_k": 1}, files=query
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0][0]["label"] == "cat"
    assert len(answer.json()["neighbours"][0]) == 2  # CONVSERVE_GALLERY_K
