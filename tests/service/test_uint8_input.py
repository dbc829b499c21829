"""A model exported with uint8 input, served: its rows are pixels, its graph normalizes them, and it
answers as the float32 export of the same weights does. V2 takes its own input as UINT8."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnx
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc

from modelcontract import EMBEDDING_NAME, UINT8, ModelMetadata, softmax
from service.errors import InvalidInputError, StartupError
from service.inference.predictor import uint8_pixels
from service.inference.preprocessing import ImagePreprocessor
from service.models.runtime import OnnxModel, load_model
from service.protocols.v2codec import IMAGE_INPUT, TensorSpec, parse_infer_request, serialize_bytes
from tests.explainmodel import parity_photos
from tests.liveserver import LiveServer, live_server
from tests.memory import traced_peak
from tests.photos import encode, jpeg, photo
from tests.tinymodel import TINY_LABELS, TINY_SPEC, export_tiny, tiny_settings
from training.backbones import create_model
from training.export import export_onnx
from training.modelfile import read_metadata, set_metadata

FLOAT_MODEL, PIXEL_MODEL = "tiny32", "tiny8"
SHAPE = (3, *TINY_SPEC.input_size)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same seeded LeNet-5 twice: `tiny32` with float32 input, `tiny8` with uint8 input."""
    root = tmp_path_factory.mktemp("models")
    export_tiny(root / FLOAT_MODEL / "1", TINY_LABELS, seed=0)
    torch.manual_seed(0)
    export_onnx(
        create_model("lenet5", num_classes=len(TINY_LABELS), pretrained=False),
        root / PIXEL_MODEL / "1",
        labels=TINY_LABELS,
        eval_spec=TINY_SPEC,
        backbone="lenet5",
        parity_inputs=parity_photos(),
        input_dtype=UINT8,
    )
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[LiveServer]:
    with live_server(tiny_settings(repository), grpc=True) as live:
        yield live


@pytest.fixture(scope="module")
def pixel_model(repository: Path) -> OnnxModel:
    return load_model(repository / PIXEL_MODEL / "1" / "model.onnx", ["CPUExecutionProvider"], 1)


@pytest.fixture(scope="module")
def metadata(repository: Path) -> dict[str, ModelMetadata]:
    return {
        name: read_metadata(repository / name / "1" / "model.onnx") for name in (FLOAT_MODEL, PIXEL_MODEL)
    }


def _rows(metadata: ModelMetadata, data: bytes) -> np.ndarray:
    """The row the service makes of an encoded image for the model `metadata` describes: [1, 3, H, W]."""
    return ImagePreprocessor.from_metadata(metadata)(data)[None]


def _v2(server: LiveServer, model: str, body: bytes, header_length: int | None = None) -> httpx.Response:
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    return httpx.post(f"{server.url}/v2/models/{model}/infer", content=body, headers=headers, timeout=30)


def _binary_request(tensor: np.ndarray, datatype: str) -> tuple[bytes, int]:
    raw = tensor.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": datatype,
                    "shape": list(tensor.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
        }
    ).encode()
    return header + raw, len(header)


def _json_request(values: Any, shape: list[int], datatype: str = "UINT8") -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input", "datatype": datatype, "shape": shape, "data": values}]}
    ).encode()


def _logits(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def _refusal(response: httpx.Response) -> str:
    assert 400 <= response.status_code < 500, response.text
    return str(response.json()["error"])


# ---- the runtime ---------------------------------------------------------------------------------------


def test_a_uint8_model_loads_and_runs_uint8_batches(pixel_model: OnnxModel) -> None:
    assert pixel_model.metadata.input_dtype == UINT8
    assert pixel_model.session.get_inputs()[0].type == "tensor(uint8)"
    pixel_model.warmup([1, 3])  # zeros of the model's own dtype
    assert pixel_model.run(np.zeros((2, *SHAPE), np.uint8)).shape == (2, len(TINY_LABELS))


def test_a_graph_whose_input_type_contradicts_its_metadata_is_refused_at_load(
    repository: Path, tmp_path: Path
) -> None:
    source = repository / PIXEL_MODEL / "1" / "model.onnx"
    proto = onnx.load(str(source))
    set_metadata(proto, dataclasses.replace(read_metadata(source), input_dtype="float32"))
    (tmp_path / "m" / "1").mkdir(parents=True)
    onnx.save_model(proto, str(tmp_path / "m" / "1" / "model.onnx"))
    refusal = r"is tensor\(uint8\), but its metadata's input_dtype says float32.*input_dtype 'uint8'"
    with pytest.raises(StartupError, match=refusal):
        load_model(tmp_path / "m" / "1" / "model.onnx", ["CPUExecutionProvider"], 1)


@pytest.mark.parametrize("name", [FLOAT_MODEL, PIXEL_MODEL])
def test_the_io_binding_path_gives_what_session_run_gives(repository: Path, name: str) -> None:
    """The path a CUDA session takes (`bind_device`), forced onto the CPU: same outputs as `session.run`,
    batch after batch of changing shapes (the bound buffers are reused per shape)."""
    model = load_model(repository / name / "1" / "model.onnx", ["CPUExecutionProvider"], 1)
    bound = dataclasses.replace(model, bind_device="cpu")
    assert model.bind_device is None and bound.bind_device == "cpu"
    dtype = np.dtype(model.metadata.input_dtype)
    rng = np.random.default_rng(0)
    for rows in (2, 3, 2):
        batch = rng.integers(0, 256, (rows, *SHAPE)) if dtype == np.uint8 else rng.normal(size=(rows, *SHAPE))
        batch = batch.astype(dtype)
        expected = model.session.run(["logits", EMBEDDING_NAME], {"input": batch})
        logits, extra = bound.run(batch, extra={EMBEDDING_NAME})
        np.testing.assert_array_equal(logits, expected[0])
        np.testing.assert_array_equal(extra[EMBEDDING_NAME], expected[1])


# ---- serving end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("photo_name", ["chelsea", "coffee", "astronaut"])
def test_predict_on_a_uint8_model_matches_the_float32_export(server: LiveServer, photo_name: str) -> None:
    data = jpeg(photo_name)
    answers = {}
    for model in (FLOAT_MODEL, PIXEL_MODEL):
        response = httpx.post(
            f"{server.url}/predict?model={model}&top_k=3", files=[("file", ("p.jpg", data, "image/jpeg"))]
        )
        assert response.status_code == 200, response.text
        answers[model] = response.json()["predictions"][0]
    floats, pixels = answers[FLOAT_MODEL], answers[PIXEL_MODEL]
    assert pixels[0]["index"] == floats[0]["index"]
    by_index = {p["index"]: p["score"] for p in floats}
    for entry in pixels:
        assert abs(entry["score"] - by_index[entry["index"]]) <= 1e-4


def test_v2_metadata_and_config_advertise_uint8(server: LiveServer) -> None:
    metadata = httpx.get(f"{server.url}/v2/models/{PIXEL_MODEL}").json()
    assert metadata["inputs"][0] == {"name": "input", "datatype": "UINT8", "shape": [-1, *SHAPE]}
    assert metadata["inputs"][1]["datatype"] == "BYTES"
    config = httpx.get(f"{server.url}/v2/models/{PIXEL_MODEL}/config").json()
    assert config["input"][0]["data_type"] == "TYPE_UINT8"
    assert httpx.get(f"{server.url}/v2/models/{FLOAT_MODEL}").json()["inputs"][0]["datatype"] == "FP32"
    assert (
        httpx.get(f"{server.url}/v2/models/{FLOAT_MODEL}/config").json()["input"][0]["data_type"]
        == "TYPE_FP32"
    )


@pytest.mark.parametrize("data", [jpeg("chelsea"), encode(photo("astronaut"), "PNG")], ids=["jpeg", "png"])
def test_v2_uint8_tensor_binary_json_and_image_input_agree(
    server: LiveServer, metadata: dict[str, ModelMetadata], data: bytes
) -> None:
    pixels = _rows(metadata[PIXEL_MODEL], data)
    assert pixels.dtype == np.uint8
    body, length = _binary_request(pixels, "UINT8")
    from_binary = _logits(_v2(server, PIXEL_MODEL, body, length))
    from_json = _logits(_v2(server, PIXEL_MODEL, _json_request(pixels.tolist(), list(pixels.shape))))
    image = serialize_bytes([data])  # binary: the PNG is too large for base64 in the JSON header
    image_header = json.dumps(
        {
            "inputs": [
                {
                    "name": IMAGE_INPUT,
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(image)},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
        }
    ).encode()
    from_image = _logits(_v2(server, PIXEL_MODEL, image_header + image, len(image_header)))
    np.testing.assert_array_equal(from_binary, from_json)
    np.testing.assert_array_equal(from_binary, from_image)  # the server made the same pixels
    raw = _v2(server, PIXEL_MODEL, pixels.tobytes(), header_length=0)  # the whole body is one input
    assert raw.status_code == 200, raw.text
    # And the float32 export, fed the float32 rows of the same image, says the same within rounding.
    rows = _rows(metadata[FLOAT_MODEL], data)
    body, length = _binary_request(rows, "FP32")
    np.testing.assert_allclose(_logits(_v2(server, FLOAT_MODEL, body, length)), from_binary, atol=1e-4)


def test_tritonclient_sends_uint8_over_rest_and_grpc(
    server: LiveServer, metadata: dict[str, ModelMetadata]
) -> None:
    pixels = _rows(metadata[PIXEL_MODEL], jpeg("coffee"))
    expected = _logits(_v2(server, PIXEL_MODEL, *_binary_request(pixels, "UINT8")))
    rest = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    rest_input = triton.InferInput("input", list(pixels.shape), "UINT8")
    rest_input.set_data_from_numpy(pixels, binary_data=True)
    np.testing.assert_array_equal(rest.infer(PIXEL_MODEL, [rest_input]).as_numpy("logits"), expected)
    grpc_client = triton_grpc.InferenceServerClient(url=server.grpc_url)
    try:
        grpc_input = triton_grpc.InferInput("input", list(pixels.shape), "UINT8")
        grpc_input.set_data_from_numpy(pixels)
        np.testing.assert_array_equal(
            grpc_client.infer(PIXEL_MODEL, [grpc_input]).as_numpy("logits"), expected
        )
        metadata = grpc_client.get_model_metadata(PIXEL_MODEL)
        assert metadata.inputs[0].datatype == "UINT8"
    finally:
        grpc_client.close()


def test_predict_takes_a_uint8_models_pixels_as_a_json_tensor_or_npy(
    server: LiveServer, metadata: dict[str, ModelMetadata]
) -> None:
    pixels = _rows(metadata[PIXEL_MODEL], jpeg("chelsea"))
    expected = softmax(_logits(_v2(server, PIXEL_MODEL, *_binary_request(pixels, "UINT8"))))[0]
    url = f"{server.url}/predict?model={PIXEL_MODEL}&top_k=1"
    npy = io.BytesIO()
    np.save(npy, pixels)
    for response in (
        httpx.post(url, json={"inputs": pixels.tolist()}),
        httpx.post(url, content=npy.getvalue(), headers={"Content-Type": "application/x-npy"}),
    ):
        assert response.status_code == 200, response.text
        best = response.json()["predictions"][0][0]
        assert best["index"] == int(expected.argmax()) and abs(best["score"] - expected.max()) <= 1e-6
    refused = httpx.post(url, json={"inputs": (pixels + 0.5).tolist()})
    assert refused.status_code == 422
    assert "whole numbers from 0 to 255; got" in refused.json()["error"]


@pytest.mark.parametrize(
    ("make_body", "message"),
    [
        (
            lambda: _binary_request(np.zeros((1, *SHAPE), np.float32), "FP32"),
            "input 'input' must be UINT8 [N, 3, 32, 32], got datatype 'FP32'",
        ),
        (
            lambda: (_json_request([256] * (3 * 32 * 32), [1, *SHAPE]), None),
            "must hold UINT8 pixel values, whole numbers from 0 to 255; got 256.0",
        ),
        (
            lambda: (_json_request([1.5] * (3 * 32 * 32), [1, *SHAPE]), None),
            "whole numbers from 0 to 255; got 1.5",
        ),
        (
            lambda: (_json_request([-1] * (3 * 32 * 32), [1, *SHAPE]), None),
            "whole numbers from 0 to 255; got -1.0",
        ),
        (
            lambda: _binary_request(np.zeros((1, *SHAPE), np.float32), "UINT8"),
            "needs 1 x 3072 = 3072 bytes of UINT8 data, got 12288",
        ),
        (
            lambda: (np.zeros(3 * 32 * 32 * 4, np.uint8).tobytes(), 0),
            "must be one UINT8 tensor [1, 3, 32, 32], 3072 bytes; got 12288 bytes",
        ),
    ],
)
def test_v2_refuses_what_a_uint8_model_cannot_take_saying_what_it_expects(
    server: LiveServer, make_body: Any, message: str
) -> None:
    body, length = make_body()
    assert message in _refusal(_v2(server, PIXEL_MODEL, body, length))


def _typed_uint8(values: list[int], field: str = "uint_contents") -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=PIXEL_MODEL)
    entry = message.inputs.add(name="input", datatype="UINT8")
    entry.shape.extend([1, *SHAPE])
    getattr(entry.contents, field).extend(values)
    return message


def test_grpc_typed_uint_contents_carry_pixels_and_refuse_values_over_255(
    server: LiveServer, metadata: dict[str, ModelMetadata]
) -> None:
    pixels = _rows(metadata[PIXEL_MODEL], jpeg("coffee"))
    expected = _logits(_v2(server, PIXEL_MODEL, *_binary_request(pixels, "UINT8")))
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(_typed_uint8(pixels.ravel().tolist()))
        typed = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(1, -1)
        np.testing.assert_array_equal(typed, expected)
        for message, refusal in (
            (_typed_uint8([300] * pixels.size), "whole numbers from 0 to 255; got 300"),
            (
                _typed_uint8([0.5] * pixels.size, "fp32_contents"),
                "takes its values in contents.uint_contents",
            ),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(message)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
            assert refusal in str(refused.value.details())


def test_the_codec_keeps_fp32_models_as_they_were() -> None:
    """A spec without a datatype is FP32: the same tensor, the same messages as before UINT8 existed."""
    spec = TensorSpec("input", (3, 2, 2), "logits", ("a", "b"), max_rows=4)
    values = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    request = parse_infer_request(_json_request(values.tolist(), [1, 3, 2, 2], "FP32"), None, spec)
    assert request.inputs.tensor is not None and request.inputs.tensor.dtype == np.float32
    np.testing.assert_array_equal(request.inputs.tensor, values)
    uint8 = dataclasses.replace(spec, input_datatype="UINT8")
    parsed = parse_infer_request(_json_request(values.astype(int).tolist(), [1, 3, 2, 2]), None, uint8)
    assert parsed.inputs.tensor is not None and parsed.inputs.tensor.dtype == np.uint8


def test_pixels_sent_as_numbers_are_checked_without_temporaries_of_the_tensors_size() -> None:
    # 8 Mi float32 values (32 MiB, what JSON parses into): the check may hold the uint8 result and a
    # few MiB more, not the comparison masks and rounded copy of the whole tensor (~56 MiB).
    values = np.tile(np.arange(256, dtype=np.float32), 32 * 1024)
    pixels, peak = traced_peak(lambda: uint8_pixels(values, "the tensor"))
    np.testing.assert_array_equal(pixels, values.astype(np.uint8))
    assert peak <= values.size + 16 * 2**20, peak
    values[-1] = 255.5  # in the last slice: every slice is checked
    with pytest.raises(InvalidInputError, match=r"got 255\.5"):
        uint8_pixels(values, "the tensor")
