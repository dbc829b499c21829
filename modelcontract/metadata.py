"""The metadata a model carries inside its ONNX file: one typed object, its JSON form and its checks.

The ONNX file's `metadata_props` hold one key, `METADATA_KEY`, whose value is the JSON of
`ModelMetadata.to_json()`. Training builds a `ModelMetadata` and writes `to_props()`; the service and
the tools read it back with `ModelMetadata.from_props`, which refuses anything that does not follow
the contract with a message naming the field, what it should be, and the file it came from.

`SCHEMA_VERSION` numbers the layout. A reader accepts every version up to its own (a file without
the field predates it and is version 1) and refuses newer ones, so a layout change is detected at load
time instead of being half-understood. Raise it when a field changes meaning or becomes required, or
when a new field changes what the model's outputs or inputs mean (an older reader would serve them
wrongly instead of refusing). Version 2 added `output_kind`; version 1 files are logits models.
Version 3 added `explain_output` and `explain_weights`: a second graph output, the last feature map,
and the initializer holding the head's weights, from which class activation maps are made. Files of
older versions have neither; an older reader would refuse the graph's second output anyway, but with a
message about the graph instead of one about its version.
Version 4 added `embedding_output`, `embedding_size` and `embedding_normalized`: a graph output holding
each image's embedding (for training's exports, the pooled features the head's linear layer reads), its
width, and whether its rows already have unit length. Files of older versions have none (the three
read as None) and are served as before. This code always writes the current version, embedding or not:
one writer path, and a reader older than a file refuses it by its version with the way out, the same
message whatever the file holds.
Version 5 added `input_dtype`: "float32" (the graph takes the normalized CHW rows the evaluation
transform makes) or "uint8" (the graph takes the RGB pixels after the resize and crop, [N, 3, H, W],
and normalizes them itself with `mean` and `std`). Files of older versions read as float32. An older
reader would feed a uint8 graph float32 rows (ONNX Runtime refuses them at every request), so the
field raises the version.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from modelcontract.graph import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, l2_normalize, softmax
from modelcontract.transform import FLOAT32, INPUT_DTYPES, EvalSpec

METADATA_KEY = "convserve"
"""The one `metadata_props` key of an ONNX file that holds the metadata JSON."""
SCHEMA_VERSION = 5
"""Version of the metadata layout this code writes and the newest it reads."""
LOGITS = "logits"
"""`output_kind` of a model whose output rows are unnormalized scores: serving applies softmax."""
PROBABILITIES = "probabilities"
"""`output_kind` of a model whose output rows already are probabilities (a softmax inside the graph)."""
OUTPUT_KINDS = (LOGITS, PROBABILITIES)
_OUTPUT_KIND_SINCE = 2
"""The schema version that introduced `output_kind`: older files hold logits models."""
_EXPLAIN_OUTPUT_SINCE = 3
"""The schema version that introduced `explain_output`: older files have no class activation maps."""
_EMBEDDING_SINCE = 4
"""The schema version that introduced `embedding_output`: older files have no embedding."""
_INPUT_DTYPE_SINCE = 5
"""The schema version that introduced `input_dtype`: older files take float32."""

# The JSON keys, each written and read only here.
_SCHEMA_VERSION = "schema_version"
_LABELS = "labels"
_NUM_CLASSES = "num_classes"
_INPUT_SHAPE = "input_shape"
_RESIZE_SIZE = "resize_size"
_INTERPOLATION = "interpolation"
_MEAN = "mean"
_STD = "std"
_BACKBONE = "backbone"
_PRECISION = "precision"
_VAL_ACCURACY = "val_accuracy"
_PARITY = "parity_max_abs_diff"
_CREATED = "created"
_INPUT_NAME = "input_name"
_OUTPUT_NAME = "output_name"
_OPSET = "opset"
_OUTPUT_KIND = "output_kind"
_EXPLAIN_OUTPUT = "explain_output"
_EXPLAIN_WEIGHTS = "explain_weights"
_EMBEDDING_OUTPUT = "embedding_output"
_EMBEDDING_SIZE = "embedding_size"
_EMBEDDING_NORMALIZED = "embedding_normalized"
_INPUT_DTYPE = "input_dtype"
_REQUIRED = (_LABELS, _INPUT_SHAPE, _MEAN, _STD, _RESIZE_SIZE, _INTERPOLATION)
CONTRACT_FIELDS = frozenset(
    {
        _SCHEMA_VERSION, _LABELS, _NUM_CLASSES, _INPUT_SHAPE, _RESIZE_SIZE, _INTERPOLATION, _MEAN, _STD,
        _BACKBONE, _PRECISION, _VAL_ACCURACY, _PARITY, _CREATED, _INPUT_NAME, _OUTPUT_NAME, _OPSET,
        _OUTPUT_KIND, _EXPLAIN_OUTPUT, _EXPLAIN_WEIGHTS, _EMBEDDING_OUTPUT, _EMBEDDING_SIZE,
        _EMBEDDING_NORMALIZED, _INPUT_DTYPE,
    }
)  # fmt: skip
"""The keys `ModelMetadata` owns; anything else in the JSON is kept in `extra`."""


class MetadataError(ValueError):
    """A model's metadata is missing or does not follow the contract."""


@dataclass(frozen=True)
class ModelMetadata:
    """What a model file says about itself: its labels, its evaluation transform, where it came from."""

    labels: tuple[str, ...]
    """Class names, in the order of the logits."""
    eval_spec: EvalSpec
    """The evaluation transform the model was validated with; serving rebuilds it from here."""
    backbone: str = "unknown"
    """Architecture name the model was built from (e.g. efficientnet_lite0)."""
    precision: str = "fp32"
    """Numeric precision of the weights: fp32, or int8 for a quantized variant."""
    val_accuracy: float | None = None
    """Top-1 accuracy on the validation split, a fraction in [0, 1]; None when not measured."""
    parity_max_abs_diff: float | None = None
    """Largest absolute softmax difference between PyTorch and ONNX Runtime at export."""
    created: str | None = None
    """When the file was written, ISO 8601 UTC."""
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    opset: int = ONNX_OPSET
    output_kind: str = LOGITS
    """What the output rows are: `logits` (softmax gives the scores) or `probabilities` (they are)."""
    explain_output: str | None = None
    """Name of the graph output holding the last feature map, float32 [N, C, h, w], or None when the
    model cannot explain its answers."""
    explain_weights: str | None = None
    """Name of the graph initializer holding the head's weights, float32 [num_classes, C]; set exactly
    when `explain_output` is. Class activation maps are `graph.class_activation_maps` of the two."""
    embedding_output: str | None = None
    """Name of the graph output holding each image's embedding, float32 [N, `embedding_size`], or None
    when the model declares none. The three embedding fields are set together or not at all."""
    embedding_size: int | None = None
    """Width of one embedding row (for training's exports, the channels the head pools)."""
    embedding_normalized: bool | None = None
    """Whether the graph already scales every embedding row to unit L2 length (`graph.l2_normalize`);
    `unit_embeddings` gives unit rows either way."""
    input_dtype: str = FLOAT32
    """What the graph's input holds: `float32`, the normalized rows of the evaluation transform, or
    `uint8`, the RGB pixels after its resize and crop (the graph normalizes them with `mean`/`std`)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Further JSON fields (quantization details, weights origin, ...), kept and written back as they are."""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        if not self.labels or not all(isinstance(label, str) for label in self.labels):
            raise ValueError(f"{_LABELS!r} must be a non-empty list of strings, got {list(self.labels)!r}")
        if self.val_accuracy is not None and not 0.0 <= self.val_accuracy <= 1.0:
            raise ValueError(
                f"{_VAL_ACCURACY!r} must be a fraction in [0, 1] or null, got {self.val_accuracy}"
            )
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"{_OUTPUT_KIND!r} must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        if self.output_kind != LOGITS:
            # A reader of an older version would take the probabilities for logits instead of refusing.
            self._require_version(f"{_OUTPUT_KIND!r} {self.output_kind!r}", _OUTPUT_KIND_SINCE)
        if (self.explain_output is None) != (self.explain_weights is None):
            raise ValueError(
                f"{_EXPLAIN_OUTPUT!r} and {_EXPLAIN_WEIGHTS!r} go together: set both or neither, got "
                f"{self.explain_output!r} and {self.explain_weights!r}"
            )
        if self.explain_output is not None:
            self._require_version(repr(_EXPLAIN_OUTPUT), _EXPLAIN_OUTPUT_SINCE)
            if self.explain_output in ("", self.output_name, self.input_name):
                raise ValueError(
                    f"{_EXPLAIN_OUTPUT!r} must name a graph output other than the input and "
                    f"{self.output_name!r}, got {self.explain_output!r}"
                )
        self._check_embedding()
        if self.input_dtype not in INPUT_DTYPES:
            raise ValueError(f"{_INPUT_DTYPE!r} must be one of {INPUT_DTYPES}, got {self.input_dtype!r}")
        if self.input_dtype != FLOAT32:
            # A reader of an older version would feed the graph float32 rows instead of refusing the file.
            self._require_version(f"{_INPUT_DTYPE!r} {self.input_dtype!r}", _INPUT_DTYPE_SINCE)
        clashes = sorted(CONTRACT_FIELDS & set(self.extra))
        if clashes:
            raise ValueError(f"extra metadata may not override contract fields {clashes}")

    def _require_version(self, what: str, since: int) -> None:
        """ValueError unless the schema version is `since` or later, the one that introduced `what`."""
        if self.schema_version < since:
            raise ValueError(f"{what} needs schema version {since} or later, got {self.schema_version}")

    def _check_embedding(self) -> None:
        output, size, normalized = self.embedding_output, self.embedding_size, self.embedding_normalized
        if output is None and size is None and normalized is None:
            return
        if output is None or size is None or normalized is None:
            raise ValueError(
                f"{_EMBEDDING_OUTPUT!r}, {_EMBEDDING_SIZE!r} and {_EMBEDDING_NORMALIZED!r} go together: "
                f"set all three or none, got {output!r}, {size!r} and {normalized!r}"
            )
        self._require_version(repr(_EMBEDDING_OUTPUT), _EMBEDDING_SINCE)
        taken = [name for name in (self.input_name, self.output_name, self.explain_output) if name]
        if output in ("", *taken):
            raise ValueError(
                f"{_EMBEDDING_OUTPUT!r} must name a graph output of its own, none of {taken}, got {output!r}"
            )
        if not _is_int(size) or size < 1:
            raise ValueError(f"{_EMBEDDING_SIZE!r} must be a positive integer, got {size!r}")
        if not isinstance(normalized, bool):
            raise ValueError(f"{_EMBEDDING_NORMALIZED!r} must be true or false, got {normalized!r}")

    @property
    def has_embedding(self) -> bool:
        """Whether the graph has an embedding output declared here."""
        return self.embedding_output is not None

    @property
    def explainable(self) -> bool:
        """Whether the model carries what class activation maps are made from."""
        return self.explain_output is not None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one input image."""
        height, width = self.eval_spec.input_size
        return (3, height, width)

    @property
    def resize_size(self) -> int:
        """Shorter image side in pixels after resizing, before the center crop."""
        return self.eval_spec.resize_size

    @property
    def interpolation(self) -> str:
        return self.eval_spec.interpolation

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.eval_spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.eval_spec.std

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """The class probabilities of the model's output rows [N, num_classes], in float64.

        The one place that decides what the outputs mean: softmax of logits, or the rows themselves
        when the graph already computes probabilities.
        """
        if self.output_kind == PROBABILITIES:
            return np.asarray(outputs, dtype=np.float64)
        return softmax(outputs)

    def unit_embeddings(self, rows: np.ndarray) -> np.ndarray:
        """The embedding output's rows [N, embedding_size] at unit L2 length, float32, so that a dot
        product is a cosine similarity: the rows themselves when the graph normalizes them, else
        `graph.l2_normalize` of them. The one place that decides whether rows still need scaling."""
        if self.embedding_normalized:
            return np.asarray(rows, dtype=np.float32)
        return l2_normalize(rows)

    def to_json(self) -> dict[str, Any]:
        """The metadata as the JSON object stored in the file (contract fields first, then `extra`)."""
        spec = self.eval_spec
        return {
            _SCHEMA_VERSION: self.schema_version,
            _LABELS: list(self.labels),
            _NUM_CLASSES: self.num_classes,
            _INPUT_SHAPE: list(self.input_shape),
            _RESIZE_SIZE: spec.resize_size,
            _INTERPOLATION: spec.interpolation,
            _MEAN: list(spec.mean),
            _STD: list(spec.std),
            _BACKBONE: self.backbone,
            _PRECISION: self.precision,
            _VAL_ACCURACY: self.val_accuracy,
            _PARITY: self.parity_max_abs_diff,
            _CREATED: self.created,
            _INPUT_NAME: self.input_name,
            _OUTPUT_NAME: self.output_name,
            _OPSET: self.opset,
            _OUTPUT_KIND: self.output_kind,
            _EXPLAIN_OUTPUT: self.explain_output,
            _EXPLAIN_WEIGHTS: self.explain_weights,
            _EMBEDDING_OUTPUT: self.embedding_output,
            _EMBEDDING_SIZE: self.embedding_size,
            _EMBEDDING_NORMALIZED: self.embedding_normalized,
            _INPUT_DTYPE: self.input_dtype,
            **self.extra,
        }

    def to_props(self) -> dict[str, str]:
        """The ONNX `metadata_props` entries that carry this metadata (`onnx.helper.set_model_props`)."""
        return {METADATA_KEY: json.dumps(self.to_json())}

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str) -> ModelMetadata:
        """Parse and check the metadata among an ONNX file's `metadata_props`; `source` names the file."""
        return cls.from_json(props.get(METADATA_KEY), source)

    @classmethod
    def from_json(cls, text: str | None, source: str) -> ModelMetadata:
        """Parse and check the metadata JSON (None: the file has none); `source` goes into error messages."""
        if text is None:
            raise MetadataError(
                f"{source} has no {METADATA_KEY!r} metadata; export it with `python -m training export` "
                "so it carries its labels and preprocessing"
            )
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MetadataError(f"{source}: {METADATA_KEY!r} metadata is not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise MetadataError(f"{source}: {METADATA_KEY!r} metadata must be a JSON object")
        try:
            return _from_dict(raw)
        except ValueError as exc:
            raise MetadataError(f"{source}: {exc}") from exc


def _from_dict(raw: dict[str, Any]) -> ModelMetadata:
    """The checked `ModelMetadata` of a metadata JSON object; ValueError naming the first bad field."""
    version = raw.get(_SCHEMA_VERSION, 1)
    if not _is_int(version) or version < 1:
        raise ValueError(f"{_SCHEMA_VERSION!r} must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{METADATA_KEY!r} metadata has schema version {version}, newer than the {SCHEMA_VERSION} this "
            "code reads; upgrade convserve to serve this model, or export it with this version"
        )
    missing = sorted(set(_REQUIRED) - set(raw))
    if missing:
        raise ValueError(f"{METADATA_KEY!r} metadata lacks {missing}")
    labels = raw[_LABELS]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{_LABELS!r} must be a non-empty list of strings")
    if _NUM_CLASSES in raw and raw[_NUM_CLASSES] != len(labels):
        raise ValueError(f"{_NUM_CLASSES!r} is {raw[_NUM_CLASSES]!r} but there are {len(labels)} labels")
    shape = raw[_INPUT_SHAPE]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape)):
        raise ValueError(f"{_INPUT_SHAPE!r} must be three positive integers, got {shape!r}")
    if shape[0] != 3:
        raise ValueError(f"{_INPUT_SHAPE!r} must be [3, H, W] (RGB), got {shape}")
    resize_size = raw[_RESIZE_SIZE]
    if not _is_int(resize_size) or resize_size < 1:
        raise ValueError(f"{_RESIZE_SIZE!r} must be a positive integer, got {resize_size!r}")
    spec = EvalSpec(
        input_size=(shape[1], shape[2]),
        resize_size=resize_size,
        interpolation=_string(raw, _INTERPOLATION, None),
        mean=_triple(raw, _MEAN),
        std=_triple(raw, _STD),
    )
    return ModelMetadata(
        labels=tuple(labels),
        eval_spec=spec,
        backbone=_string(raw, _BACKBONE, "unknown"),
        precision=_string(raw, _PRECISION, "fp32"),
        val_accuracy=_optional_number(raw, _VAL_ACCURACY),
        parity_max_abs_diff=_optional_number(raw, _PARITY),
        created=raw[_CREATED] if isinstance(raw.get(_CREATED), str) else None,
        input_name=_string(raw, _INPUT_NAME, INPUT_NAME),
        output_name=_string(raw, _OUTPUT_NAME, OUTPUT_NAME),
        opset=_positive_int(raw, _OPSET, ONNX_OPSET),
        output_kind=_string(raw, _OUTPUT_KIND, LOGITS),
        explain_output=_optional_string(raw, _EXPLAIN_OUTPUT),
        explain_weights=_optional_string(raw, _EXPLAIN_WEIGHTS),
        embedding_output=_optional_string(raw, _EMBEDDING_OUTPUT),
        embedding_size=_optional_positive_int(raw, _EMBEDDING_SIZE),
        embedding_normalized=_optional_bool(raw, _EMBEDDING_NORMALIZED),
        input_dtype=_string(raw, _INPUT_DTYPE, FLOAT32),
        extra={key: value for key, value in raw.items() if key not in CONTRACT_FIELDS},
        schema_version=version,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _string(raw: dict[str, Any], key: str, default: str | None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {value!r}")
    return value


def _optional_string(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string or null, got {value!r}")
    return value


def _optional_number(raw: dict[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if not _is_number(value):
        raise ValueError(f"{key!r} must be a finite number or null, got {value!r}")
    return float(value)


def _positive_int(raw: dict[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if not _is_int(value) or value < 1:
        raise ValueError(f"{key!r} must be a positive integer, got {value!r}")
    return int(value)


def _optional_positive_int(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(f"{key!r} must be a positive integer or null, got {value!r}")
    return value


def _optional_bool(raw: dict[str, Any], key: str) -> bool | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{key!r} must be true, false or null, got {value!r}")
    return value


def _triple(raw: dict[str, Any], key: str) -> tuple[float, float, float]:
    value = raw[key]
    if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)):
        raise ValueError(f"{key!r} must be three finite numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))
