"""`convserve import`: publish an ONNX image classifier convserve did not export into the repository.

Torch-free: `onnx` reads and edits the graph, ONNX Runtime runs it once, numpy and Pillow preprocess.
Everything is checked in memory before anything is written: the graph's interface (`onnxgraph`), the
labels (`labels`), the preprocessing (an `EvalSpec`), then one inference on a decoded picture through
the service's own `ImagePreprocessor`, whose outputs must be finite, [N, labels] and, when declared,
probabilities; a named embedding must come out finite [N, D], of unit rows when declared normalized.
Only then is the file, its metadata inside, published as the model's next version with one rename
(`modelcontract.publish_version`), as training publishes its exports.
"""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from PIL import Image

from convserve.errors import UsageError
from convserve.importoptions import (
    AUTO,
    CROP_FRACTION,
    DEFAULT_INTERPOLATION,
    DEFAULT_NORMALIZATION,
    EMBEDDING_NORMALIZED_CHOICES,
    NORMALIZATIONS,
    YES,
    Triple,
)
from convserve.labels import read_labels
from convserve.onnxgraph import EmbeddingTensor, GraphInterface, conform, expose_embedding, inspect_graph
from modelcontract import MODEL_FILENAME, EvalSpec, EvalTransform, ModelMetadata, publish_version
from modelcontract.metadata import LOGITS, PROBABILITIES
from service.errors import ServiceError
from service.inference.preprocessing import ImagePreprocessor
from service.models.repository import MAX_NAME_BYTES

MAX_INPUT_SIDE = 4096
"""Largest --size or --resize, in pixels: beyond any classifier, and it bounds the smoke run's memory."""
MAX_SERIALIZED_BYTES = 2**31 - 1
"""Protobuf cannot serialize a message past 2 GiB; such models keep their weights in external files."""
PROBABILITY_TOLERANCE = 1e-3
"""How far from 1 a row's sum may be for the outputs to count as probabilities (float32 softmax)."""
UNIT_TOLERANCE = 1e-3
"""How far from 1 an embedding row's L2 norm may be for the rows to count as normalized."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ImportRequest:
    """What `convserve import` was asked to do; the fields are its options."""

    model: Path
    name: str
    labels: Path
    repository: Path = Path("models")
    mean: str | None = None
    """A preset of `NORMALIZATIONS` or "M,M,M"; None = `DEFAULT_NORMALIZATION`."""
    std: str | None = None
    """"S,S,S", only with an explicit mean."""
    size: int | None = None
    """Side of the square input crop in pixels; None = the graph's fixed H and W."""
    resize: int | None = None
    """Shorter side after resizing, before the crop, in pixels; None = floor(size / CROP_FRACTION)."""
    interpolation: str = DEFAULT_INTERPOLATION
    layout: str = AUTO
    output: str = AUTO
    sample: Path | None = None
    """A picture for the smoke inference; None = a generated test pattern."""
    logits_output: str | None = None
    """The graph output holding the class scores; None = the only output (the embedding aside)."""
    embedding_output: str | None = None
    """A graph output or intermediate tensor to serve as the embedding; None = no embedding."""
    embedding_normalized: str | None = None
    """One of `EMBEDDING_NORMALIZED_CHOICES`, only with `embedding_output`; None = auto."""


@dataclass(frozen=True)
class ImportedModel:
    """A published version."""

    path: Path
    """Its `model.onnx`."""
    version: int
    metadata: ModelMetadata
    fixed_batch: int | None
    """The graph's fixed batch size (the service never forms a larger batch), or None when dynamic."""
    layout: str
    """The layout the graph came with (an NHWC one now starts with a Transpose)."""
    embedding: EmbeddingTensor | None = None
    """Where the embedding comes from, when one was named."""


def import_model(request: ImportRequest) -> ImportedModel:
    """Check, convert and publish `request.model` as the next version of `request.name`."""
    check_name(request.name)
    normalized = embedding_choice(request.embedding_output, request.embedding_normalized)
    labels = read_labels(request.labels)
    mean, std = normalization(request.mean, request.std)
    source = str(request.model)
    model = _load(request.model)
    interface = inspect_graph(model, request.layout, source, request.logits_output, request.embedding_output)
    classes = interface.output_dims[1]
    if isinstance(classes, int) and classes != len(labels):
        raise _class_mismatch(source, classes, request.labels, len(labels))
    size = input_size(interface, request.size, source)
    spec = eval_spec(size, request.resize, request.interpolation, mean, std)
    conform(model, interface, size)
    embedding = None
    if request.embedding_output is not None:
        embedding = expose_embedding(model, request.embedding_output, interface, source)
    # A fixed batch runs as declared; a symbolic one with two rows, so a graph whose batch axis only
    # claims to be symbolic (a reshape to 1 inside) fails here rather than under traffic.
    batch = smoke_batch(spec, interface.batch or 2, request.sample)
    outputs, rows = run_once(_serialized(model, source), batch, interface, source, embedding)
    if outputs.shape[1] != len(labels):
        raise _class_mismatch(source, outputs.shape[1], request.labels, len(labels))
    metadata = ModelMetadata(
        labels=labels,
        eval_spec=spec,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        input_name=interface.input_name,
        output_name=interface.output_name,
        opset=interface.opset or 1,
        output_kind=output_kind(outputs, request.output, source),
        extra={
            "imported": {"file": request.model.name, "layout": interface.layout, "producer": _producer(model)}
        },
    )
    if embedding is not None and rows is not None:
        metadata = dataclasses.replace(
            metadata,
            embedding_output=embedding.output,
            embedding_size=rows.shape[1],
            embedding_normalized=embedding_normalized(rows, normalized, source),
        )
    properties = {entry.key: entry.value for entry in model.metadata_props}  # the file's own are kept
    onnx.helper.set_model_props(model, {**properties, **metadata.to_props()})
    path = publish(_serialized(model, source), request.repository, request.name)
    return ImportedModel(path, int(path.parent.name), metadata, interface.batch, interface.layout, embedding)


def check_name(name: str) -> None:
    """`name` is a model directory the service and URLs handle plainly, or `UsageError`."""
    if not _NAME.fullmatch(name) or len(name.encode()) > MAX_NAME_BYTES:
        raise UsageError(
            f"--name {name!r} is not a usable model name: use letters, digits, '.', '_' and '-', starting "
            f"with a letter or digit, at most {MAX_NAME_BYTES} characters"
        )


def normalization(mean: str | None, std: str | None) -> tuple[Triple, Triple]:
    """(mean, std) from the `--mean` and `--std` options."""
    if mean is None or mean in NORMALIZATIONS:
        if std is not None:
            raise UsageError(
                "--std goes with explicit numbers for --mean (--mean M,M,M --std S,S,S); "
                f"the presets {', '.join(NORMALIZATIONS)} set both"
            )
        return NORMALIZATIONS[mean or DEFAULT_NORMALIZATION]
    means = _triple(mean, "--mean")
    if std is None:
        raise UsageError(f"--mean {mean} needs --std S,S,S too (--std 1,1,1 divides by nothing)")
    stds = _triple(std, "--std")
    if min(stds) <= 0:
        raise UsageError(f"--std {std}: every value must be positive")
    if max(*means, *stds) > 1:
        raise UsageError(
            f"--mean {mean} --std {std}: convserve scales pixels to [0, 1] before normalizing; values "
            "above 1 look like the 0-255 scale, divide them by 255"
        )
    return means, stds


def _triple(text: str, option: str) -> Triple:
    parts = text.split(",")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 3 or not all(np.isfinite(values)):
        presets = "|".join(NORMALIZATIONS) if option == "--mean" else ""
        expected = f"three comma-separated numbers (R,G,B){' or one of ' + presets if presets else ''}"
        raise UsageError(f"{option} {text!r}: expected {expected}, e.g. 0.5,0.5,0.5")
    return (values[0], values[1], values[2])


def input_size(interface: GraphInterface, size: int | None, source: str) -> tuple[int, int]:
    """(H, W) to serve: `--size` (square), else the graph's fixed H and W."""
    declared = interface.spatial
    shown = "x".join("?" if not isinstance(d, int) else str(d) for d in declared)
    if size is None:
        if interface.fixed_size is None:
            raise UsageError(f"{source} does not fix its input height and width ({shown}); pass --size N")
        chosen = interface.fixed_size
    else:
        if any(isinstance(d, int) and d != size for d in declared):
            raise UsageError(f"--size {size} but {source} fixes its input to {shown}; leave out --size")
        chosen = (size, size)
    if max(chosen) > MAX_INPUT_SIDE:
        raise UsageError(f"input size {chosen[0]}x{chosen[1]} is larger than {MAX_INPUT_SIDE} pixels a side")
    return chosen


def eval_spec(
    size: tuple[int, int], resize: int | None, interpolation: str, mean: Triple, std: Triple
) -> EvalSpec:
    """The evaluation transform: resize the shorter side, center-crop `size`, normalize."""
    resize_size = resize if resize is not None else int(min(size) / CROP_FRACTION)
    if resize_size > MAX_INPUT_SIDE:
        raise UsageError(f"--resize {resize_size} is larger than {MAX_INPUT_SIDE} pixels")
    try:
        return EvalSpec(size, resize_size, interpolation, mean, std)
    except ValueError as exc:
        raise UsageError(f"preprocessing: {exc}") from None


def smoke_batch(spec: EvalSpec, rows: int, sample: Path | None) -> np.ndarray:
    """`rows` preprocessed images [rows, 3, H, W]: the sample (or a test pattern) decoded by the
    service's own preprocessor, then its mirror image, alternating."""
    data = _read_sample(sample) if sample is not None else pattern_image()
    preprocess = ImagePreprocessor(EvalTransform.from_spec(spec))
    name = str(sample) if sample is not None else "the test pattern"
    try:
        row = preprocess(data, name)
    except ServiceError as exc:
        raise UsageError(f"--sample: {exc.message}") from None
    variants = (row, np.ascontiguousarray(row[:, :, ::-1]))
    return np.stack([variants[index % 2] for index in range(rows)])


def _read_sample(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--sample {path}: cannot read it ({exc.strerror or exc})") from None


def pattern_image() -> bytes:
    """A 320x240 JPEG of colour gradients: a real encoded picture, no file needed."""
    y, x = np.mgrid[0:240, 0:320]
    pixels = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run_once(
    data: bytes, batch: np.ndarray, interface: GraphInterface, source: str, embedding: EmbeddingTensor | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The graph's class scores for `batch` on ONNX Runtime (CPU), and its embedding rows when it has
    one; `UsageError` if it cannot produce them."""
    options = ort.SessionOptions()
    options.log_severity_level = (
        3  # ORT's own warnings about the foreign graph would drown the one-line answer
    )
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for graphs it cannot load
        raise UsageError(f"ONNX Runtime cannot load {source}: {_one_line(exc)}") from None
    try:
        names = [interface.output_name, *([embedding.output] if embedding is not None else [])]
        outputs, *extra = session.run(names, {interface.input_name: batch})
    except Exception as exc:  # ditto for graphs that fail to run
        how = "a batch" if interface.batch is None else "its fixed batch"
        raise UsageError(
            f"{source} fails on {how} of {len(batch)} images {list(batch.shape)}: {_one_line(exc)}; check "
            "--size and --layout, or re-export the model with a dynamic batch axis"
        ) from None
    outputs = np.asarray(outputs)
    if outputs.ndim != 2 or outputs.shape[0] != len(batch):
        raise UsageError(
            f"{source} answered {len(batch)} images with an output of shape {list(outputs.shape)}; expected "
            f"[{len(batch)}, classes]"
        )
    if not np.isfinite(outputs).all():
        raise UsageError(
            f"{source} produced NaN or infinite outputs for a real picture; the model is broken or expects "
            "other preprocessing (check --mean/--std and --layout)"
        )
    rows = embedding_rows(np.asarray(extra[0]), len(batch), embedding, source) if embedding else None
    return outputs.astype(np.float32, copy=False), rows


def embedding_rows(rows: np.ndarray, images: int, embedding: EmbeddingTensor, source: str) -> np.ndarray:
    """`rows`, the embedding the smoke run fetched for `images` images, if it is finite float32 [N, D]."""
    where = f"--embedding-output {embedding.tensor!r}"
    if embedding.flattened:
        where += " (flattened)"
    size = embedding.size
    expected = f"[{images}, {size if size is not None else 'D'}]"
    if rows.dtype != np.float32 or rows.ndim != 2 or rows.shape[0] != images or rows.shape[1] < 1:
        raise UsageError(
            f"{source}: {where} answered {images} images with {rows.dtype} of shape {list(rows.shape)}; "
            f"expected float32 {expected}, one row of features per image"
        )
    if size is not None and rows.shape[1] != size:
        raise UsageError(
            f"{source}: {where} declares {size} features per row but produced {rows.shape[1]}; the graph "
            "contradicts itself, re-export it"
        )
    if not np.isfinite(rows).all():
        raise UsageError(
            f"{source}: {where} holds NaN or infinite values for a real picture; the model is broken or "
            "expects other preprocessing (check --mean/--std and --layout)"
        )
    return rows


def embedding_choice(output: str | None, normalized: str | None) -> str:
    """The `--embedding-normalized` choice, checked against `--embedding-output`."""
    if normalized is not None and output is None:
        raise UsageError(f"--embedding-normalized {normalized} goes with --embedding-output NAME")
    if normalized is not None and normalized not in EMBEDDING_NORMALIZED_CHOICES:
        choices = ", ".join(EMBEDDING_NORMALIZED_CHOICES)
        raise UsageError(f"--embedding-normalized {normalized!r}: expected one of {choices}")
    return normalized or AUTO


def embedding_normalized(rows: np.ndarray, requested: str, source: str) -> bool:
    """Whether the graph's embedding rows have unit L2 length: as requested, or (auto) when every
    smoke-run row is within `UNIT_TOLERANCE` of 1."""
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    unit = bool(np.all(np.abs(norms - 1.0) <= UNIT_TOLERANCE))
    if requested == YES and not unit:
        raise UsageError(
            f"--embedding-normalized yes, but {source}'s embedding rows have L2 norms from {norms.min():.4g} "
            f"to {norms.max():.4g}, not 1; use --embedding-normalized no (the service normalizes them)"
        )
    return unit if requested == AUTO else requested == YES


def output_kind(outputs: np.ndarray, requested: str, source: str) -> str:
    """`logits` or `probabilities`: as requested, or (auto) probabilities when every row is non-negative
    and sums to 1."""
    sums = outputs.astype(np.float64).sum(axis=1)
    probabilities = bool((outputs >= 0).all() and np.allclose(sums, 1.0, atol=PROBABILITY_TOLERANCE))
    if requested == AUTO:
        return PROBABILITIES if probabilities else LOGITS
    if requested == PROBABILITIES and not probabilities:
        raise UsageError(
            f"--output probabilities, but {source}'s outputs are not probabilities (values from "
            f"{outputs.min():.3g} to {outputs.max():.3g}, row sums {sums.min():.3g} to {sums.max():.3g}); "
            "use --output logits so the service applies softmax"
        )
    return requested


def publish(data: bytes, repository: Path, name: str) -> Path:
    """Write `data` as `repository/name/<next version>/model.onnx` with one rename; its path.

    The file is written into a hidden staging directory of the repository (the service skips names
    starting with "."), so the version appears complete or not at all.
    """
    try:
        repository.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=repository))
    except OSError as exc:
        raise UsageError(f"--repository {repository}: cannot write there ({exc.strerror or exc})") from None
    try:
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a service running as another user must read it
        (staging / MODEL_FILENAME).write_bytes(data)
        model_dir = repository / name
        model_dir.mkdir(exist_ok=True)
        return publish_version(staging, model_dir) / MODEL_FILENAME
    except OSError as exc:
        raise UsageError(f"--repository {repository}: cannot publish there ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; pass the ONNX file to import") from None
    except (DecodeError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable ONNX file: {_one_line(exc)}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _serialized(model: onnx.ModelProto, source: str) -> bytes:
    if model.ByteSize() > MAX_SERIALIZED_BYTES:
        raise UsageError(
            f"{source} holds more than 2 GiB of weights; convserve serves single-file models only"
        )
    return model.SerializeToString()


def _class_mismatch(source: str, classes: int, labels_path: Path, labels: int) -> UsageError:
    return UsageError(
        f"{source} outputs {classes} classes but {labels_path} lists {labels} labels; give one label per "
        "output class, in output order"
    )


def _producer(model: onnx.ModelProto) -> str:
    return f"{model.producer_name} {model.producer_version}".strip() or "unknown"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:400] + "…"
