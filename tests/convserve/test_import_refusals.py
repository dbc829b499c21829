"""What `convserve import` refuses, with one line naming the problem, and how it publishes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto

from convserve.errors import UsageError
from convserve.importer import ImportRequest, import_model
from convserve.labels import read_labels
from modelcontract import MODEL_FILENAME, complete_versions
from modelcontract.metadata import LOGITS, PROBABILITIES
from tests.convserve.graphs import classifier, save, with_input, with_second_input
from tests.photos import jpeg


def request(tmp_path: Path, model: onnx.ModelProto | Path, labels: Path, **options: object) -> ImportRequest:
    path = model if isinstance(model, Path) else save(model, tmp_path / "model.onnx")
    fields: dict[str, object] = {"name": "imported", "repository": tmp_path / "repo", **options}
    return ImportRequest(model=path, labels=labels, **fields)  # type: ignore[arg-type]


def refused(tmp_path: Path, model: onnx.ModelProto | Path, labels: Path, **options: object) -> str:
    """The one-line refusal; nothing may have been written into the repository."""
    with pytest.raises(UsageError) as refusal:
        import_model(request(tmp_path, model, labels, **options))
    message = str(refusal.value)
    assert "\n" not in message
    repository = tmp_path / "repo"
    assert not repository.exists() or not any(repository.iterdir()), list(repository.rglob("*"))
    return message


REFUSALS = {
    "label-count": (classifier(classes=5), {}, r"outputs 5 classes but .*labels\.txt lists 3 labels"),
    "rank-3": (
        with_input(classifier(), TensorProto.FLOAT, ["N", 24, 24]),
        {},
        r"rank 3 \[N, 24, 24\].*expected an image batch of rank 4",
    ),
    "two-inputs": (
        with_second_input(classifier()),
        {},
        r"has 2 inputs \('images', 'temperature'\).*exactly one image input",
    ),
    "uint8-input": (
        with_input(classifier(), TensorProto.UINT8, ["N", 3, 24, 24]),
        {},
        r"input 'images' is uint8; convserve feeds float32",
    ),
    "nan-outputs": (classifier(poison=True), {}, r"NaN or infinite outputs"),
    "one-channel": (
        with_input(classifier(), TensorProto.FLOAT, ["N", 1, 24, 24]),
        {},
        r"no axis of 3 colour channels",
    ),
    "ambiguous-layout": (
        with_input(classifier(), TensorProto.FLOAT, ["N", 3, 24, 3]),
        {},
        r"cannot tell NCHW from NHWC; pass --layout",
    ),
    "no-size": (
        classifier(size=None),
        {},
        r"does not fix its input height and width \(\?x\?\); pass --size N",
    ),
    "size-conflict": (
        classifier(),
        {"size": 32},
        r"--size 32 but .* fixes its input to 24x24; leave out --size",
    ),
    "not-probabilities": (
        classifier(),
        {"output": PROBABILITIES},
        r"--output probabilities, but .* not probabil",
    ),
    "std-without-mean": (
        classifier(),
        {"std": "0.2,0.2,0.2"},
        r"--std goes with explicit numbers for --mean",
    ),
    "short-mean": (classifier(), {"mean": "0.5,0.5"}, r"--mean '0.5,0.5': expected three comma-separated"),
    "0-255-mean": (
        classifier(),
        {"mean": "123.7,116.3,103.5", "std": "58,57,57"},
        r"look like the 0-255 scale",
    ),
    "mean-without-std": (classifier(), {"mean": "0.5,0.5,0.5"}, r"needs --std S,S,S too"),
    "resize-below-crop": (classifier(), {"resize": 20}, r"'resize_size' \(20\) must be at least the shorter"),
    "bad-name": (classifier(), {"name": "../escape"}, r"--name '../escape' is not a usable model name"),
}


@pytest.mark.parametrize(("model", "options", "expected"), list(REFUSALS.values()), ids=list(REFUSALS))
def test_import_refuses_with_one_line_and_writes_nothing(
    tmp_path: Path, labels: Path, model: onnx.ModelProto, options: dict[str, object], expected: str
) -> None:
    assert read_labels(labels) == ("cat", "dog", "bird")
    message = refused(tmp_path, model, labels, **options)
    assert re.search(expected, message), message


def test_missing_files_are_named(tmp_path: Path, labels: Path) -> None:
    message = refused(tmp_path, classifier(), tmp_path / "nowhere.txt")
    assert "nowhere.txt does not exist; pass --labels FILE" in message
    message = refused(tmp_path, tmp_path / "absent.onnx", labels)
    assert "absent.onnx does not exist" in message
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf at all" * 10)
    assert "not a readable ONNX file" in refused(tmp_path, garbage, labels)


def test_each_import_publishes_the_next_version_with_the_contract_inside(
    tmp_path: Path, labels: Path
) -> None:
    model_dir = tmp_path / "repo" / "imported"
    (model_dir / "1").mkdir(parents=True)  # taken, even without a model.onnx: numbers are never reused
    first = import_model(request(tmp_path, classifier(), labels))
    second = import_model(request(tmp_path, classifier(softmax=True), labels))
    assert (first.version, second.version) == (2, 3)
    assert complete_versions(model_dir) == [2, 3]
    assert first.path == model_dir / "2" / MODEL_FILENAME
    assert (first.metadata.output_kind, second.metadata.output_kind) == (LOGITS, PROBABILITIES)
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["imported"]  # no staging left behind
    stored = onnx.load(str(second.path))
    props = {entry.key: entry.value for entry in stored.metadata_props}
    document = json.loads(props["convserve"])
    assert document["labels"] == ["cat", "dog", "bird"] and document["output_kind"] == PROBABILITIES
    assert document["input_shape"] == [3, 24, 24] and document["resize_size"] == 27  # floor(24 / 0.875)


def test_a_failed_publish_leaves_no_partial_version(tmp_path: Path, labels: Path) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "imported").write_text("a file where the model's directory should be")
    with pytest.raises(UsageError, match="cannot publish there"):
        import_model(request(tmp_path, classifier(), labels))
    assert sorted(p.name for p in repository.iterdir()) == ["imported"]  # the staging directory is gone


def test_an_nhwc_graph_gets_an_nchw_input_with_its_own_name(tmp_path: Path, labels: Path) -> None:
    imported = import_model(request(tmp_path, classifier(layout="nhwc", batch=1), labels))
    graph = onnx.load(str(imported.path)).graph
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert (graph.input[0].name, dims) == ("images", [1, 3, 24, 24])
    assert graph.node[0].op_type == "Transpose" and list(graph.node[0].attribute[0].ints) == [0, 2, 3, 1]
    assert imported.fixed_batch == 1 and imported.layout == "nhwc"


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        ('["cat", "dog"]', "l.json", ("cat", "dog")),
        ('{"1": "dog", "0": "cat"}', "l.json", ("cat", "dog")),
        ('{"0": ["n02123045", "tabby"], "1": ["n02084071", "dog"]}', "l.json", ("tabby", "dog")),
    ],
)
def test_labels_come_from_json_lists_and_index_objects(
    tmp_path: Path, text: str, name: str, expected: tuple[str, ...]
) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert read_labels(path) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"0": "cat", "2": "dog"}', "keys must be the indices 0 to 1"),
        ('{"labels": 1}', "keys must be the indices"),
        ('["cat", 3]', "item 1 must be a non-empty string"),
        ("[not json", "is not valid JSON"),
        ('["only"]', "holds 1 label(s); a classifier needs at least 2"),
    ],
)
def test_bad_label_files_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "labels.json"
    path.write_text(text)
    with pytest.raises(UsageError) as refusal:
        read_labels(path)
    assert expected in str(refusal.value)


def test_the_smoke_run_takes_a_given_photo_and_refuses_a_file_that_is_not_one(
    tmp_path: Path, labels: Path
) -> None:
    photo_path = tmp_path / "chelsea.jpg"
    photo_path.write_bytes(jpeg("chelsea"))
    assert import_model(request(tmp_path, classifier(), labels, sample=photo_path)).version == 1
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("just text")
    with pytest.raises(UsageError, match=r"--sample: .*notes\.jpg"):
        import_model(request(tmp_path, classifier(), labels, sample=not_a_photo))
    assert complete_versions(tmp_path / "repo" / "imported") == [1]
