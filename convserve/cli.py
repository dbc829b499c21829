"""The `convserve` command: `serve`, `import`, `predict` and `train`, each a thin layer over a module.

- `serve` sets the `CONVSERVE_*` variables its options name and runs the service (`python -m service`);
- `import` publishes a foreign ONNX classifier into the repository (`convserve.importer`);
- `predict` sends image files to a server and prints the top-k of each (`convserve.client`);
- `train` hands its arguments to `python -m training` when PyTorch is installed.
Mistakes the user can fix are one line on stderr and exit status 2; a server's refusal exits 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from convserve.client import (
    DEFAULT_GRPC_TARGET,
    DEFAULT_URL,
    ServerError,
    format_predictions,
    predict_grpc,
    predict_http,
    read_images,
)
from convserve.errors import UsageError
from convserve.importoptions import (
    AUTO,
    CROP_FRACTION,
    DEFAULT_INTERPOLATION,
    DEFAULT_NORMALIZATION,
    EMBEDDING_NORMALIZED_CHOICES,
    LAYOUTS,
    NORMALIZATIONS,
    OUTPUT_CHOICES,
)
from modelcontract import INTERPOLATIONS

if TYPE_CHECKING:  # the importer loads onnx; the command's help must not
    from convserve.importer import ImportedModel

PROG = "convserve"
USAGE_ERROR = 2
SERVER_ERROR = 1
TRAIN_EXTRA = "pip install 'convserve[train]'"
SERVE_EXTRA = "pip install 'convserve[serve]'"
REPOSITORY_ENV = "CONVSERVE_MODEL_REPOSITORY"
TOKEN_ENV = "CONVSERVE_INFERENCE_TOKEN"
SERVE_OPTIONS = {
    "repository": REPOSITORY_ENV,
    "host": "CONVSERVE_HOST",
    "port": "CONVSERVE_PORT",
    "grpc_port": "CONVSERVE_GRPC_PORT",
    "workers": "CONVSERVE_WORKERS",
}
"""`serve` options and the service settings they set."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def port_number(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve image classifiers with ONNX Runtime; import, query and train them.",
        epilog=f"Run `{PROG} COMMAND --help` for a command's options. Formats: docs/model-format.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_import(commands)
    _add_predict(commands)
    commands.add_parser(
        "train",
        help=f"fine-tune and export a model: runs `python -m training ARGS...` (needs {TRAIN_EXTRA})",
        description=f"Runs `python -m training` with every argument after `train`; needs {TRAIN_EXTRA}.",
        add_help=False,
    )
    return parser


def _setting_default(field: str) -> str:
    """The service's default for a setting, read from `Settings` so the help cannot drift from it."""
    try:
        from service.settings import Settings  # noqa: PLC0415  (the serving extra; only for the help)
    except ImportError:  # installed without the serving extra: `serve` cannot run anyway
        return "the service's default"
    return str(Settings.model_fields[field].default)


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the inference server (as `python -m service`)",
        description=(
            "Run the inference server. Each option sets the CONVSERVE_* variable named in its help; every "
            "other setting (batching, limits, tokens, TLS, logging...) is read from the environment as for "
            "`python -m service`: see docs/configuration.md."
        ),
    )
    serve.add_argument(
        "--repository", type=Path, metavar="DIR",
        help=f"model repository, <name>/<version>/model.onnx ({REPOSITORY_ENV}; "
        f"default: {_setting_default('model_repository')})",
    )  # fmt: skip
    serve.add_argument(
        "--host",
        metavar="H",
        help=f"interface address to listen on (CONVSERVE_HOST; default: {_setting_default('host')})",
    )
    serve.add_argument(
        "--port",
        type=port_number,
        metavar="P",
        help=f"HTTP port (CONVSERVE_PORT; default: {_setting_default('port')})",
    )
    serve.add_argument(
        "--grpc-port", type=port_number, metavar="P",
        help="KServe V2 gRPC port, 0 = no gRPC (CONVSERVE_GRPC_PORT; "
        f"default: {_setting_default('grpc_port')})",
    )  # fmt: skip
    serve.add_argument(
        "--workers", type=positive_int, metavar="N",
        help="worker processes, each with its own model copy (CONVSERVE_WORKERS; "
        f"default: {_setting_default('workers')})",
    )  # fmt: skip


def _add_import(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    presets = "|".join(NORMALIZATIONS)
    command = commands.add_parser(
        "import",
        help="publish an ONNX image classifier (timm, torchvision, Keras/tf2onnx...) into the repository",
        description=(
            "Check an ONNX image classifier, run it once on a real decoded picture through the service's "
            "preprocessing, write convserve's metadata into it and publish it as the next version "
            "<repository>/<name>/<version>/model.onnx. Nothing is written unless every check passes. "
            "See docs/model-format.md."
        ),
    )
    command.add_argument("model", type=Path, metavar="MODEL.onnx", help="the ONNX file to import")
    command.add_argument("--name", required=True, help="model name: the repository directory (required)")
    command.add_argument(
        "--labels", required=True, type=Path, metavar="FILE",
        help="class names in output order: text, one per line (blank lines ignored), or a .json list or "
        "object index -> label (required)",
    )  # fmt: skip
    command.add_argument(
        "--repository", type=Path, metavar="DIR", default=Path(os.environ.get(REPOSITORY_ENV, "models")),
        help=f"model repository to publish into (default: ${REPOSITORY_ENV}, else ./models)",
    )  # fmt: skip
    group = command.add_argument_group("preprocessing (what the model was trained with)")
    group.add_argument(
        "--mean", metavar=f"M,M,M|{presets}",
        help=f"per-channel RGB mean on the [0, 1] pixel scale, or a preset: imagenet (0.485,0.456,0.406 / "
        "0.229,0.224,0.225), inception (0.5 / 0.5), none (0 / 1: the graph normalizes itself) "
        f"(default: {DEFAULT_NORMALIZATION})",
    )  # fmt: skip
    group.add_argument("--std", metavar="S,S,S", help="per-channel RGB std; only with numbers for --mean")
    group.add_argument(
        "--size", type=positive_int, metavar="N",
        help="input height and width in pixels (default: the graph's fixed H and W; required if those are "
        "not fixed)",
    )  # fmt: skip
    group.add_argument(
        "--resize", type=positive_int, metavar="N",
        help="shorter image side after resizing, before the center crop, in pixels (default: "
        f"floor(size / {CROP_FRACTION}))",
    )  # fmt: skip
    group.add_argument(
        "--interpolation",
        choices=INTERPOLATIONS,
        default=DEFAULT_INTERPOLATION,
        help=f"resize filter (default: {DEFAULT_INTERPOLATION})",
    )
    graph = command.add_argument_group("the graph")
    graph.add_argument(
        "--layout", choices=LAYOUTS, default=AUTO,
        help="input layout: nchw [N,3,H,W], or nhwc [N,H,W,3] (Keras, tf2onnx; a Transpose is prepended so "
        "the served input is NCHW); auto = the one the channel axis of 3 shows (default: auto)",
    )  # fmt: skip
    graph.add_argument(
        "--output", choices=OUTPUT_CHOICES, default=AUTO,
        help="what the output rows are: logits (the service applies softmax) or probabilities (served as "
        "they are); auto = probabilities when the smoke run's rows are non-negative and sum to 1 "
        "(default: auto)",
    )  # fmt: skip
    graph.add_argument(
        "--sample", type=Path, metavar="IMAGE",
        help="picture for the smoke inference (default: a generated test pattern)",
    )  # fmt: skip
    graph.add_argument(
        "--logits-output", metavar="NAME",
        help="the graph output holding the class scores; required when the graph has several outputs "
        "besides the embedding, which are then dropped (default: the only one)",
    )  # fmt: skip
    embedding = command.add_argument_group("embedding (for /predict?embedding=true and galleries)")
    embedding.add_argument(
        "--embedding-output", metavar="NAME",
        help="a graph output or intermediate tensor to serve as each image's embedding: float32 [N, D], "
        "or [N, D, 1, 1] as a global average pool makes it (then flattened) (default: no embedding)",
    )  # fmt: skip
    embedding.add_argument(
        "--embedding-normalized", choices=EMBEDDING_NORMALIZED_CHOICES,
        help="whether the graph already scales each embedding row to unit L2 length; auto = yes when "
        "every smoke-run row does (default: auto)",
    )  # fmt: skip


def _add_predict(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = commands.add_parser(
        "predict",
        help="classify image files with a running server and print the top-k of each",
        description="Send image files in one request and print each file's classes, best first. A server "
        "error is printed as the server's message, exit status 1.",
    )
    command.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="image files (JPEG, PNG, WebP, BMP, GIF)"
    )
    command.add_argument(
        "--url",
        help=f"server address (default: {DEFAULT_URL}; with --grpc host:port, default {DEFAULT_GRPC_TARGET})",
    )
    command.add_argument(
        "--model", help="model name (default: the server's default model; required with --grpc)"
    )
    command.add_argument(
        "--top-k", type=positive_int, metavar="K",
        help="classes per file (default: 5, or all classes if fewer)",
    )  # fmt: skip
    command.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV),
        help=f"inference token, sent as `Authorization: Bearer` (default: ${TOKEN_ENV} if set)",
    )  # fmt: skip
    command.add_argument(
        "--grpc", action="store_true",
        help="use the KServe V2 gRPC API (ModelInfer with Triton's classification) instead of POST /predict; "
        "its scores are the model's raw outputs (logits, unless the model outputs probabilities)",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["train"]:  # every option belongs to `python -m training`, --help included
        return train(arguments[1:])
    parser = build_parser()
    options = parser.parse_args(arguments)
    try:
        if options.command == "serve":
            return serve(options)
        if options.command == "import":
            return import_command(options)
        return predict(options)
    except UsageError as exc:
        print(f"{PROG} {options.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


def serve(options: argparse.Namespace) -> int:
    for option, variable in SERVE_OPTIONS.items():
        value = getattr(options, option)
        if value is not None:
            os.environ[variable] = str(value)
    try:
        from service.__main__ import main as serve_main  # noqa: PLC0415  (the serving extra, only here)
    except ImportError as exc:
        raise UsageError(f"serving needs the serving extra ({exc}); install it with {SERVE_EXTRA}") from None
    serve_main()
    return 0


def import_command(options: argparse.Namespace) -> int:
    from convserve.importer import ImportRequest, import_model  # noqa: PLC0415  (onnx, only here)

    imported = import_model(
        ImportRequest(
            model=options.model,
            name=options.name,
            labels=options.labels,
            repository=options.repository,
            mean=options.mean,
            std=options.std,
            size=options.size,
            resize=options.resize,
            interpolation=options.interpolation,
            layout=options.layout,
            output=options.output,
            sample=options.sample,
            logits_output=options.logits_output,
            embedding_output=options.embedding_output,
            embedding_normalized=options.embedding_normalized,
        )
    )
    metadata = imported.metadata
    batch = "dynamic batch" if imported.fixed_batch is None else f"fixed batch of {imported.fixed_batch}"
    print(
        f"imported {options.model} as {options.name!r} version {imported.version}: {imported.path} "
        f"(input {list(metadata.input_shape)} from {imported.layout.upper()}, {metadata.num_classes} labels, "
        f"{metadata.output_kind}, {batch}{_embedding_summary(imported)})"
    )
    return 0


def _embedding_summary(imported: ImportedModel) -> str:
    """The summary line's words on the embedding (name, width, normalization); empty without one."""
    metadata, embedding = imported.metadata, imported.embedding
    if embedding is None or not metadata.has_embedding:
        return ""
    how = "normalized" if metadata.embedding_normalized else "not normalized"
    if embedding.flattened:
        how += f", flattened from {embedding.tensor!r}"
    return f", embedding {metadata.embedding_output!r} of {metadata.embedding_size} ({how})"


def predict(options: argparse.Namespace) -> int:
    images = read_images(options.files)
    try:
        if options.grpc:
            target = (options.url or DEFAULT_GRPC_TARGET).removeprefix("http://")
            rows = predict_grpc(target, images, options.top_k, options.model, options.token)
        else:
            rows = predict_http(
                options.url or DEFAULT_URL, images, options.top_k, options.model, options.token
            )
    except ServerError as exc:
        print(f"{PROG} predict: {exc}", file=sys.stderr)
        return SERVER_ERROR
    print(format_predictions([str(path) for path in options.files], rows))
    return 0


def train(arguments: list[str]) -> int:
    if importlib.util.find_spec("torch") is None:
        print(f"{PROG} train: error: training needs PyTorch; install it with {TRAIN_EXTRA}", file=sys.stderr)
        return USAGE_ERROR
    # A child process: the command itself never imports training (or torch).
    return subprocess.run([sys.executable, "-m", "training", *arguments], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
