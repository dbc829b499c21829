"""The export's feature-map output: present for every head that pools a feature map, checked like the
logits, declared in the metadata; absent (and old files still served) otherwise. (The embedding output
every classifier gets beside it is tests/training/test_export_embedding.py's subject.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from modelcontract import (
    EMBEDDING_NAME,
    FEATURES_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    SCHEMA_VERSION,
    MetadataError,
    ModelMetadata,
    class_activation_maps,
)
from service.models.runtime import load_model
from tests.explainmodel import (
    FEATURE_CHANNELS,
    FEATURE_SIZE,
    export_explainable,
    parity_photos,
    tiny_conv_classifier,
)
from tests.tinymodel import TINY_LABELS, export_tiny
from training.export import ExportParityError, _maps_parity
from training.feature_output import drop_output
from training.modelfile import read_metadata, set_metadata


@pytest.fixture(scope="module")
def explainable_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_explainable(tmp_path_factory.mktemp("explain") / "1")


def test_a_pooled_feature_map_is_exported_beside_the_logits_and_declared(explainable_path: Path) -> None:
    proto = onnx.load(str(explainable_path))
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME, FEATURES_NAME, EMBEDDING_NAME]
    dims = proto.graph.output[1].type.tensor_type.shape.dim
    assert dims[0].dim_param  # the batch axis stays symbolic for the second output too
    assert [d.dim_value for d in dims[1:]] == [FEATURE_CHANNELS, FEATURE_SIZE, FEATURE_SIZE]
    metadata = read_metadata(explainable_path)
    assert metadata.schema_version == SCHEMA_VERSION
    assert metadata.explain_output == FEATURES_NAME
    assert metadata.explain_weights in {init.name for init in proto.graph.initializer}


def test_maps_from_the_file_match_pytorch(explainable_path: Path) -> None:
    """Parity, as the exporter checks it, redone from the file: ONNX Runtime's feature map times the
    file's weights against PyTorch's class activation maps of the same seeded model."""
    images = parity_photos()
    model = tiny_conv_classifier(len(TINY_LABELS)).eval()
    with torch.no_grad():
        features = model.base(images)
        expected = torch.einsum("kc,nchw->nkhw", model.head.linear.weight, features).numpy()
        # The maps' mean over positions is the logit less the bias: the head really pools this map.
        logits = model(images).numpy()
    np.testing.assert_allclose(
        expected.mean(axis=(2, 3)) + model.head.linear.bias.detach().numpy(), logits, rtol=1e-4, atol=1e-5
    )
    served = load_model(explainable_path, ["CPUExecutionProvider"], intra_op_threads=1)
    outputs, extra = served.run(images.numpy(), {FEATURES_NAME})
    onnx_features = extra[FEATURES_NAME]
    classes = np.arange(len(TINY_LABELS))
    assert served.explain_weights is not None
    maps = np.stack([class_activation_maps(row, served.explain_weights, classes) for row in onnx_features])
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outputs, logits, rtol=1e-4, atol=1e-5)


def test_the_maps_parity_check_refuses_a_graph_that_disagrees() -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    weights = rng.standard_normal((3, 4)).astype(np.float32)
    classes = np.arange(3)
    maps = np.stack([class_activation_maps(row, weights, classes) for row in features])
    assert _maps_parity(maps, features, weights, "batch") <= 1e-6
    with pytest.raises(ExportParityError, match="class activation maps differ"):
        _maps_parity(maps, features * 1.01, weights, "batch")


def test_lenet_has_no_feature_map_and_is_exported_as_before(tmp_path: Path) -> None:
    path = export_tiny(tmp_path / "1", TINY_LABELS)
    assert [o.name for o in onnx.load(str(path)).graph.output] == [OUTPUT_NAME, EMBEDDING_NAME]
    metadata = read_metadata(path)
    assert metadata.explain_output is None and metadata.explain_weights is None
    assert not load_model(path, ["CPUExecutionProvider"], intra_op_threads=1).explainable


def test_a_version_2_file_without_the_declaration_still_loads(tmp_path: Path, explainable_path: Path) -> None:
    """A model exported before version 3 (one output, no explain fields) is served as before."""
    path = export_tiny(tmp_path / "1", TINY_LABELS)
    proto = onnx.load(str(path))
    drop_output(proto, EMBEDDING_NAME)  # what the exporter wrote then: the logits only
    raw = json.loads(read_metadata(path).to_props()["convserve"])
    for key in (
        "explain_output",
        "explain_weights",
        "embedding_output",
        "embedding_size",
        "embedding_normalized",
    ):
        del raw[key]
    raw["schema_version"] = 2
    onnx.helper.set_model_props(proto, {"convserve": json.dumps(raw)})
    onnx.save(proto, str(path))
    model = load_model(path, ["CPUExecutionProvider"], intra_op_threads=1)
    assert model.metadata.schema_version == 2 and not model.explainable
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {INPUT_NAME: np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 3)


def test_the_declaration_needs_version_3_and_both_names(explainable_path: Path) -> None:
    metadata = read_metadata(explainable_path)
    raw = metadata.to_json()
    with pytest.raises(MetadataError, match="schema version 3"):
        ModelMetadata.from_json(json.dumps({**raw, "schema_version": 2}), "old.onnx")
    with pytest.raises(MetadataError, match="go together"):
        ModelMetadata.from_json(json.dumps({**raw, "explain_weights": None}), "half.onnx")
    with pytest.raises(MetadataError, match="explain_output"):
        ModelMetadata.from_json(json.dumps({**raw, "explain_output": 3}), "typed.onnx")


def test_a_declared_output_the_graph_lacks_is_refused_at_load(tmp_path: Path) -> None:
    from service.errors import StartupError  # noqa: PLC0415

    path = export_tiny(tmp_path / "1", TINY_LABELS)
    proto = onnx.load(str(path))
    claimed = read_metadata(path)
    fake = ModelMetadata(
        labels=claimed.labels,
        eval_spec=claimed.eval_spec,
        explain_output=FEATURES_NAME,
        explain_weights="nothing",
    )
    set_metadata(proto, fake)
    onnx.save(proto, str(path))
    with pytest.raises(StartupError, match="feature map"):
        load_model(path, ["CPUExecutionProvider"], intra_op_threads=1)


def test_an_int8_copy_drops_the_feature_map_and_still_serves(tmp_path: Path) -> None:
    """Quantization stores the head's weights as int8: the INT8 version offers no maps (and says so),
    instead of declaring a weights initializer it no longer has."""
    from tests.training.images import TINY_LABELS as FOLDER_LABELS  # noqa: PLC0415
    from tests.training.images import write_image_folder  # noqa: PLC0415
    from training.cli import main  # noqa: PLC0415

    model_dir = tmp_path / "models" / "seeing"
    export_explainable(model_dir / "1", list(FOLDER_LABELS))
    data = write_image_folder(tmp_path / "data")
    argv = ["quantize", "--model", str(model_dir / "1"), "--calibration", str(data)]
    assert main([*argv, "--calibration-images", "12", "--throughput-seconds", "0"]) == 0
    int8 = model_dir / "2" / "model.onnx"
    assert [o.name for o in onnx.load(str(int8)).graph.output] == [OUTPUT_NAME, EMBEDDING_NAME]
    served = load_model(int8, ["CPUExecutionProvider"], intra_op_threads=1)
    assert served.metadata.precision == "int8" and not served.explainable
