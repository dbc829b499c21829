"""Schema 4's embedding declaration: output name, size and normalization, set together or not at all."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from modelcontract import (
    EMBEDDING_NAME,
    FEATURES_NAME,
    METADATA_KEY,
    SCHEMA_VERSION,
    EvalSpec,
    MetadataError,
    ModelMetadata,
    l2_normalize,
)

SPEC = EvalSpec((32, 32), 36, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
PLAIN = ModelMetadata(labels=("cat", "dog"), eval_spec=SPEC, backbone="lenet5")
EMBEDDING = replace(PLAIN, embedding_output=EMBEDDING_NAME, embedding_size=84, embedding_normalized=True)


def _json(metadata: ModelMetadata, **changes: Any) -> str:
    """The metadata JSON of `metadata` with fields replaced (a value of ... removes the field)."""
    fields = {**metadata.to_json(), **changes}
    return json.dumps({key: value for key, value in fields.items() if value is not ...})


def test_an_embedding_declaration_round_trips_at_the_current_schema() -> None:
    props = EMBEDDING.to_props()
    written = json.loads(props[METADATA_KEY])
    assert SCHEMA_VERSION >= 4 and written["schema_version"] == SCHEMA_VERSION
    assert (written["embedding_output"], written["embedding_size"], written["embedding_normalized"]) == (
        "embedding", 84, True,
    )  # fmt: skip
    parsed = ModelMetadata.from_props(props, "model.onnx")
    assert parsed == EMBEDDING and parsed.has_embedding


def test_a_model_without_an_embedding_writes_nulls_and_reads_back_without_one() -> None:
    written = json.loads(PLAIN.to_props()[METADATA_KEY])
    assert [written[key] for key in ("embedding_output", "embedding_size", "embedding_normalized")] == [
        None
    ] * 3
    parsed = ModelMetadata.from_props(PLAIN.to_props(), "model.onnx")
    assert parsed == PLAIN and not parsed.has_embedding


def test_a_schema_3_file_loads_unchanged_with_no_embedding() -> None:
    """What exports wrote before version 4: no embedding keys at all."""
    old = _json(
        replace(PLAIN, explain_output=FEATURES_NAME, explain_weights="head.weight", schema_version=3),
        embedding_output=...,
        embedding_size=...,
        embedding_normalized=...,
    )
    parsed = ModelMetadata.from_json(old, "old.onnx")
    assert parsed.schema_version == 3 and parsed.explain_output == FEATURES_NAME
    assert (parsed.embedding_output, parsed.embedding_size, parsed.embedding_normalized) == (None, None, None)
    assert not parsed.has_embedding


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"embedding_size": None},
            "'embedding_output', 'embedding_size' and 'embedding_normalized' go together",
        ),
        ({"embedding_normalized": ...}, "go together: set all three or none, got 'embedding', 84 and None"),
        ({"schema_version": 3}, "'embedding_output' needs schema version 4 or later, got 3"),
        (
            {"embedding_output": "logits"},
            r"must name a graph output of its own, none of \['input', 'logits'\]",
        ),
        ({"embedding_output": "input"}, "'embedding_output' must name a graph output of its own"),
        ({"embedding_output": ""}, "'embedding_output' must name a graph output of its own"),
        ({"embedding_output": 3}, "'embedding_output' must be a string or null, got 3"),
        ({"embedding_size": 0}, "'embedding_size' must be a positive integer or null, got 0"),
        ({"embedding_size": 8.0}, "'embedding_size' must be a positive integer or null, got 8.0"),
        ({"embedding_size": True}, "'embedding_size' must be a positive integer or null, got True"),
        ({"embedding_normalized": "yes"}, "'embedding_normalized' must be true, false or null, got 'yes'"),
        ({"embedding_normalized": 1}, "'embedding_normalized' must be true, false or null, got 1"),
    ],
)
def test_a_bad_embedding_declaration_is_refused_naming_the_field(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(MetadataError, match=message) as refused:
        ModelMetadata.from_json(_json(EMBEDDING, **changes), "m.onnx")
    assert str(refused.value).startswith("m.onnx: ")


def test_the_embedding_may_not_reuse_the_feature_map_output() -> None:
    explained = replace(EMBEDDING, explain_output=FEATURES_NAME, explain_weights="head.weight")
    assert ModelMetadata.from_props(explained.to_props(), "m.onnx") == explained
    with pytest.raises(ValueError, match=r"none of \['input', 'logits', 'features'\], got 'features'"):
        replace(explained, embedding_output=FEATURES_NAME)


def test_the_constructor_refuses_what_the_parser_refuses() -> None:
    """Writers (the exporter, the importer, quantization) build the object, so it checks itself too."""
    with pytest.raises(ValueError, match="'embedding_size' must be a positive integer, got -1"):
        replace(EMBEDDING, embedding_size=-1)
    with pytest.raises(ValueError, match="'embedding_normalized' must be true or false, got 1"):
        replace(EMBEDDING, embedding_normalized=1)
    with pytest.raises(ValueError, match="go together"):
        replace(PLAIN, embedding_output=EMBEDDING_NAME)


def test_unit_embeddings_scales_rows_only_when_the_graph_does_not() -> None:
    rows = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1e-3, 0.0, -1e-3]], dtype=np.float32)
    scaled = replace(EMBEDDING, embedding_size=3, embedding_normalized=False).unit_embeddings(rows)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled[0], [0.6, 0.8, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(scaled[1], [0.0, 0.0, 0.0])  # a zero row stays zero, no NaN
    np.testing.assert_allclose(np.linalg.norm(scaled[2]), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(l2_normalize(rows), scaled)  # the contract's one normalization
    # A graph that normalizes already: its rows are used as they are, not scaled a second time.
    np.testing.assert_array_equal(replace(EMBEDDING, embedding_size=3).unit_embeddings(rows), rows)
