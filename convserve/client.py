"""`convserve predict`: send image files to a running server, get the top-k classes of each.

HTTP uses only the standard library (`urllib`, a multipart body to `POST /predict`), so the client
needs nothing the service does not; `--grpc` uses the V2 gRPC API (`ModelInfer`, each file one element
of the BYTES input `image`, Triton's `classification` parameter), with the message classes the service
ships, called at Triton's method paths. A server's refusal is raised as `ServerError` carrying the
server's own message.
"""

from __future__ import annotations

import json
import mimetypes
import struct
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convserve.errors import UsageError

DEFAULT_URL = "http://localhost:8000"
DEFAULT_GRPC_TARGET = "localhost:8001"
TIMEOUT_S = 60.0
"""How long one request may take end to end, in seconds."""


class ServerError(Exception):
    """The server refused or failed the request; the message is the server's own."""


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class FileImage:
    name: str
    data: bytes


def read_images(paths: list[Path]) -> list[FileImage]:
    """Every file's bytes, or `UsageError` naming the first that cannot be read."""
    images = []
    for path in paths:
        try:
            images.append(FileImage(path.name, path.read_bytes()))
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return images


def predict_http(
    url: str, images: list[FileImage], top_k: int, model: str | None, token: str | None
) -> list[list[Prediction]]:
    """The top-k of each image from `POST {url}/predict`, in the order sent."""
    query = {"top_k": str(top_k), **({"model": model} if model else {})}
    boundary = uuid.uuid4().hex
    body = _multipart(images, boundary)
    request = urllib.request.Request(
        f"{url.rstrip('/')}/predict?{urllib.parse.urlencode(query)}",
        data=body,
        method="POST",
        headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ServerError(f"HTTP {exc.code}: {_error_message(exc.read())}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(f"cannot reach {url}: {reason}") from None
    try:
        return [
            [Prediction(str(p["label"]), int(p["index"]), float(p["score"])) for p in row]
            for row in answer["predictions"]
        ]
    except (KeyError, TypeError, ValueError):
        raise ServerError(f"{url} did not answer as a convserve server: {str(answer)[:200]}") from None


def _multipart(images: list[FileImage], boundary: str) -> bytes:
    parts = []
    for image in images:
        kind = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
        safe_name = image.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{safe_name}"\r\n'
            f"Content-Type: {kind}\r\n\r\n"
        )
        parts.append(head.encode() + image.data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def _error_message(body: bytes) -> str:
    """The `error` of the service's JSON error body, else the body as text."""
    try:
        document: Any = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500] or "(empty answer)"
    if isinstance(document, dict) and "error" in document:
        return str(document["error"])
    return json.dumps(document)[:500]


def predict_grpc(
    target: str, images: list[FileImage], top_k: int, model: str | None, token: str | None
) -> list[list[Prediction]]:
    """The top-k of each image from the V2 gRPC `ModelInfer` at `target` (host:port)."""
    # The serving extra's: imported here so HTTP prediction needs nothing beyond the standard library.
    try:
        import grpc  # noqa: PLC0415

        from service.protocols.v2codec import IMAGE_INPUT  # noqa: PLC0415
        from service.protocols.v2proto import grpc_service_pb2 as pb  # noqa: PLC0415
        from service.protocols.v2proto import method_path  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError(
            f"--grpc needs grpcio ({exc}); install it with pip install 'convserve[serve]'"
        ) from None

    if not model:
        raise UsageError("--grpc needs --model NAME: the V2 gRPC API has no default model")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(target) as channel:
        model_metadata = channel.unary_unary(
            method_path("ModelMetadata"),
            request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )
        model_infer = channel.unary_unary(
            method_path("ModelInfer"),
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        try:
            described = model_metadata(
                pb.ModelMetadataRequest(name=model), metadata=metadata, timeout=TIMEOUT_S
            )
            output = described.outputs[0].name
            request = pb.ModelInferRequest(
                model_name=model,
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name=IMAGE_INPUT, datatype="BYTES", shape=[len(images)]
                    )
                ],
                outputs=[
                    pb.ModelInferRequest.InferRequestedOutputTensor(
                        name=output, parameters={"classification": pb.InferParameter(int64_param=top_k)}
                    )
                ],
                raw_input_contents=[b"".join(struct.pack("<I", len(i.data)) + i.data for i in images)],
            )
            answer = model_infer(request, metadata=metadata, timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() else "UNKNOWN"
            raise ServerError(f"gRPC {code}: {exc.details()}") from None
    return _classifications(answer.raw_output_contents[0], len(images), top_k)


def _classifications(raw: bytes, rows: int, top_k: int) -> list[list[Prediction]]:
    """Triton's classification tensor (BYTES "score:index:label", top-k per row) as predictions."""
    strings = []
    offset = 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        strings.append(raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    per_row = len(strings) // rows if rows else 0
    predictions = []
    for row in range(rows):
        entries = [text.split(":", 2) for text in strings[row * per_row : (row + 1) * per_row]]
        predictions.append([Prediction(label, int(index), float(score)) for score, index, label in entries])
    return predictions


def format_predictions(names: list[str], rows: list[list[Prediction]]) -> str:
    """The answer as text: each file's name, then its classes best first (rank, score, label, index)."""
    lines = []
    for name, row in zip(names, rows, strict=True):
        lines.append(f"{name}:")
        lines.extend(f"  {rank}. {p.score:.4f}  {p.label} (class {p.index})" for rank, p in enumerate(row, 1))
    return "\n".join(lines)
