"""The KServe V2 gRPC API against a real in-process server, with `tritonclient.grpc` unmodified.

One server (explicit model control, inference and admin tokens) serves most of the module, in this
process beside tritonclient's own generated classes; messages the client library will not build
(typed contents, missing data, wrong sizes) go through tritonclient's own generated stub. Every
refusal must carry its status, never INTERNAL, and leave the server ready. TLS and deadlines get
servers of their own; what only a whole process shows is in test_v2_grpc_process.py.
"""

from __future__ import annotations

import io
import logging
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import trustme
from google.protobuf import descriptor_pool
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from modelcontract import softmax
from service.protocols.v2grpc import max_concurrent_calls, message_limit
from service.protocols.v2proto import grpc_service_pb2
from tests.liveserver import LiveServer, live_server
from tests.photos import jpeg
from tests.service.promtext import metric
from tests.tinymodel import MODEL_NAME, TINY_LABELS, tiny_settings
from tests.waiting import wait_until

INFERENCE_TOKEN = "inference-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef0123"
AUTH = {"authorization": f"Bearer {INFERENCE_TOKEN}"}
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_UPLOAD_BYTES = 1 << 20
SHAPE = [2, 3, 32, 32]
INPUT, OUTPUT = "input", "logits"


@pytest.fixture(scope="module")
def server(model_repository: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(
        model_repository,
        model_control="explicit",
        inference_token=INFERENCE_TOKEN,
        admin_token=ADMIN_TOKEN,
        token_header="admin-key",
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_batch_size=4,
        max_queue_size=16,
    )
    with live_server(settings, grpc=True) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    grpc_client = triton.InferenceServerClient(url=server.grpc_url)
    yield grpc_client
    grpc_client.close()


@pytest.fixture
def stub(server: LiveServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """tritonclient's generated stub, for messages its client class never builds."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def tensor(rows: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 32, 32)).astype(np.float32)


def fp32_input(values: np.ndarray, name: str = INPUT) -> triton.InferInput:
    entry = triton.InferInput(name, list(values.shape), "FP32")
    entry.set_data_from_numpy(values)
    return entry


def status_of(call: Callable[[], Any]) -> str:
    """The gRPC status name a call failed with (it must fail)."""
    with pytest.raises((InferenceServerException, grpc.RpcError)) as failure:
        call()
    error = failure.value
    code = error.code() if isinstance(error, grpc.RpcError) else error.status()
    return str(code).removeprefix("StatusCode.")


def rest_scores(server: LiveServer, headers: dict[str, str] | None = None, **request: Any) -> np.ndarray:
    """`POST /predict` probabilities per row, in class-index order."""
    url = f"{server.url}/predict?top_k={len(TINY_LABELS)}"
    response = httpx.post(url, headers={**AUTH, **(headers or {})}, timeout=30, **request)
    assert response.status_code == 200, response.text
    scores = np.zeros((len(response.json()["predictions"]), len(TINY_LABELS)))
    for row, ranked in enumerate(response.json()["predictions"]):
        for entry in ranked:
            scores[row, entry["index"]] = entry["score"]
    return scores


def npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()


def raw_request(**fields: Any) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest for the tiny model; `fields` replace its defaults."""
    values = tensor(1)
    message = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
    message.inputs.add(name=fields.pop("name", INPUT), datatype=fields.pop("datatype", "FP32"))
    message.inputs[0].shape.extend(fields.pop("shape", list(values.shape)))
    message.raw_input_contents.extend(fields.pop("raw", [values.tobytes()]))
    for key, value in fields.items():
        setattr(message, key, value)
    return message


def test_tritonclient_grpc_infers_against_a_server_in_its_own_process(model_repository: Path) -> None:
    # Both sets of generated classes in protobuf's one default pool: Triton's names and ours differ.
    pool = descriptor_pool.Default()
    assert (
        pool.FindMessageTypeByName("inference.ModelInferRequest") is service_pb2.ModelInferRequest.DESCRIPTOR
    )
    assert (
        pool.FindMessageTypeByName("convserve.v2.ModelInferRequest")
        is grpc_service_pb2.ModelInferRequest.DESCRIPTOR
    )
    with live_server(tiny_settings(model_repository), grpc=True) as live:
        client = triton.InferenceServerClient(url=live.grpc_url)
        try:
            result = client.infer(MODEL_NAME, [fp32_input(tensor(2))])
        finally:
            client.close()
    assert result.as_numpy(OUTPUT).shape == (2, len(TINY_LABELS))


# ---- health, metadata, configuration ---------------------------------------------------------------


def test_health_rpcs_answer_without_a_token(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL_NAME)
    assert client.is_model_ready(MODEL_NAME, "1")
    assert not client.is_model_ready(MODEL_NAME, "7")
    assert status_of(lambda: client.is_model_ready("nonexistent")) == "NOT_FOUND"


def test_metadata_and_configuration_are_what_rest_answers(
    server: LiveServer, client: triton.InferenceServerClient
) -> None:
    served = client.get_server_metadata(headers=AUTH)
    rest = httpx.get(f"{server.url}/v2", headers=AUTH).json()
    assert (served.name, served.version, list(served.extensions)) == (
        rest["name"],
        rest["version"],
        rest["extensions"],
    )

    metadata = client.get_model_metadata(MODEL_NAME, headers=AUTH, as_json=True)
    rest = httpx.get(f"{server.url}/v2/models/{MODEL_NAME}", headers=AUTH).json()
    for key in ("name", "versions", "platform"):
        assert metadata[key] == rest[key]
    for kind in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata[kind]] == [
            (t["name"], t["datatype"], t["shape"]) for t in rest[kind]
        ]

    config = client.get_model_config(MODEL_NAME, headers=AUTH, as_json=True)["config"]
    rest = httpx.get(f"{server.url}/v2/models/{MODEL_NAME}/config", headers=AUTH).json()
    assert (config["name"], config["platform"], config["max_batch_size"]) == (
        rest["name"],
        rest["platform"],
        rest["max_batch_size"],
    )
    assert config["version_policy"] == {"latest": {"num_versions": 1}}  # REST: "latest:1"
    for kind in ("input", "output"):
        assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config[kind]] == [
            (t["name"], t["data_type"], t["dims"]) for t in rest[kind]
        ]
    assert "dynamic_batching" in config


# ---- inference ------------------------------------------------------------------------------------------


def test_fp32_raw_contents_give_the_logits_rest_predict_gives(
    server: LiveServer, client: triton.InferenceServerClient
) -> None:
    values = tensor(2)
    result = client.infer(MODEL_NAME, [fp32_input(values)], headers=AUTH, request_id="grpc-raw")
    logits = result.as_numpy(OUTPUT)
    assert logits.shape == (2, len(TINY_LABELS))
    answer = result.get_response()
    assert (answer.model_name, answer.model_version, answer.id) == (MODEL_NAME, "1", "grpc-raw")
    expected = rest_scores(server, content=npy(values), headers={"content-type": "application/x-npy"})
    np.testing.assert_allclose(softmax(logits), expected, rtol=1e-5, atol=1e-6)


def test_typed_fp32_contents_give_the_same_logits_as_raw_contents(
    client: triton.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    values = tensor(2, seed=1)
    message = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
    entry = message.inputs.add(name=INPUT, datatype="FP32")
    entry.shape.extend(values.shape)
    entry.contents.fp32_contents.extend(values.ravel().tolist())
    answer, call = stub.ModelInfer.with_call(message, metadata=(*AUTH.items(), ("x-request-id", "typed-1")))
    assert ("x-request-id", "typed-1") in call.trailing_metadata()  # echoed, as REST's header is
    typed = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(2, -1)
    raw = client.infer(MODEL_NAME, [fp32_input(values)], headers=AUTH).as_numpy(OUTPUT)
    np.testing.assert_array_equal(typed, raw)


def test_classification_output_ranks_the_logits(client: triton.InferenceServerClient) -> None:
    values = tensor(2, seed=2)
    logits = client.infer(MODEL_NAME, [fp32_input(values)], headers=AUTH).as_numpy(OUTPUT)
    outputs = [triton.InferRequestedOutput(OUTPUT, class_count=2)]
    ranked = client.infer(MODEL_NAME, [fp32_input(values)], outputs=outputs, headers=AUTH).as_numpy(OUTPUT)
    assert ranked.shape == (2, 2)
    for row, entries in zip(logits, ranked, strict=True):
        parsed = [entry.decode().split(":", 2) for entry in entries]
        assert [int(index) for _, index, _ in parsed] == list(np.argsort(-row, kind="stable")[:2])
        assert [label for _, _, label in parsed] == [TINY_LABELS[int(i)] for _, i, _ in parsed]
        np.testing.assert_allclose(
            [float(value) for value, _, _ in parsed], np.sort(row)[::-1][:2], rtol=1e-5
        )


def test_jpeg_files_as_the_image_input_give_what_rest_predict_gives(
    server: LiveServer, client: triton.InferenceServerClient
) -> None:
    photos = [jpeg("chelsea"), jpeg("coffee")]
    entry = triton.InferInput("image", [2], "BYTES")
    entry.set_data_from_numpy(np.array(photos, dtype=np.object_))
    logits = client.infer(MODEL_NAME, [entry], headers=AUTH).as_numpy(OUTPUT)
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
    np.testing.assert_allclose(softmax(logits), rest_scores(server, files=files), rtol=1e-5, atol=1e-6)


def test_jpeg_files_as_typed_bytes_contents_give_the_same_logits_as_raw_contents(
    client: triton.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    photo = jpeg("chelsea")
    message = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
    entry = message.inputs.add(name="image", datatype="BYTES", shape=[1])
    entry.contents.bytes_contents.append(photo)
    answer = stub.ModelInfer(message, metadata=tuple(AUTH.items()))
    typed = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(1, -1)
    raw_input = triton.InferInput("image", [1], "BYTES")
    raw_input.set_data_from_numpy(np.array([photo], dtype=np.object_))
    np.testing.assert_array_equal(typed, client.infer(MODEL_NAME, [raw_input], headers=AUTH).as_numpy(OUTPUT))


# ---- refusals ----------------------------------------------------------------------------------------


def _typed(field: str, values: list[Any], raw: list[bytes] | None = None) -> service_pb2.ModelInferRequest:
    """A request whose input carries typed `contents.<field>` (and `raw` contents too, if given)."""
    message = raw_request(raw=raw or [])
    getattr(message.inputs[0].contents, field).extend(values)
    return message


def _with_parameter(
    key: str, value: service_pb2.InferParameter, output: bool = False
) -> service_pb2.ModelInferRequest:
    """A request with one parameter of the request (or of its requested output)."""
    message = raw_request()
    if output:
        message.outputs.add(name=OUTPUT).parameters[key].CopyFrom(value)
    else:
        message.parameters[key].CopyFrom(value)
    return message


def _oversized() -> service_pb2.ModelInferRequest:
    rows = MAX_UPLOAD_BYTES // (3 * 32 * 32 * 4) + 1
    return raw_request(shape=[rows, 3, 32, 32], raw=[tensor(rows).tobytes()])


BAD_REQUESTS: dict[str, tuple[Callable[[], service_pb2.ModelInferRequest], str]] = {
    "wrong datatype": (lambda: raw_request(datatype="FP64"), "INVALID_ARGUMENT"),
    "wrong shape": (lambda: raw_request(shape=[1, 3, 16, 64]), "INVALID_ARGUMENT"),
    "raw size not the shape's": (lambda: raw_request(shape=[2, 3, 32, 32]), "INVALID_ARGUMENT"),
    "missing raw contents": (lambda: raw_request(raw=[]), "INVALID_ARGUMENT"),
    "two raw contents for one input": (lambda: raw_request(raw=[b"", b""]), "INVALID_ARGUMENT"),
    "unknown input": (lambda: raw_request(name="pixels"), "INVALID_ARGUMENT"),
    "corrupt image bytes": (
        lambda: raw_request(name="image", datatype="BYTES", shape=[1], raw=[b"\x04\x00\x00\x00nope"]),
        "INVALID_ARGUMENT",
    ),
    "typed contents of another type": (lambda: _typed("int_contents", [0] * 3072), "INVALID_ARGUMENT"),
    "too few typed values": (lambda: _typed("fp32_contents", [0.0] * 3071), "INVALID_ARGUMENT"),
    "both raw and typed contents": (
        lambda: _typed("fp32_contents", [0.0] * 3072, raw=[bytes(3072 * 4)]),
        "INVALID_ARGUMENT",
    ),
    "classification not a number": (
        lambda: _with_parameter(
            "classification", service_pb2.InferParameter(string_param="all"), output=True
        ),
        "INVALID_ARGUMENT",
    ),
    "timeout not a number": (
        lambda: _with_parameter("timeout", service_pb2.InferParameter(string_param="soon")),
        "INVALID_ARGUMENT",
    ),
    "id too long to echo": (lambda: raw_request(id="x" * 5000), "INVALID_ARGUMENT"),
    "message beyond MAX_UPLOAD_BYTES": (_oversized, "RESOURCE_EXHAUSTED"),
    "unknown model": (lambda: raw_request(model_name="nonexistent"), "NOT_FOUND"),
    "unknown version": (lambda: raw_request(model_version="9"), "NOT_FOUND"),
    "version not a number": (lambda: raw_request(model_version="latest"), "NOT_FOUND"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_their_status_and_leave_the_server_ready(
    case: str,
    client: triton.InferenceServerClient,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    build, expected = BAD_REQUESTS[case]
    message = build()
    assert status_of(lambda: stub.ModelInfer(message, metadata=tuple(AUTH.items()))) == expected
    assert client.is_server_ready()
    assert client.infer(MODEL_NAME, [fp32_input(tensor(1))], headers=AUTH).as_numpy(OUTPUT).shape == (1, 3)


def test_a_compressed_message_is_bounded_by_its_decompressed_size(
    client: triton.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    rows = MAX_UPLOAD_BYTES // (3 * 32 * 32 * 4) + 1
    zeros = np.zeros((rows, 3, 32, 32), dtype=np.float32)  # gzip makes it a few KiB
    message = raw_request(shape=list(zeros.shape), raw=[zeros.tobytes()])
    call = lambda: stub.ModelInfer(message, metadata=tuple(AUTH.items()), compression=grpc.Compression.Gzip)  # noqa: E731
    assert status_of(call) == "RESOURCE_EXHAUSTED"
    assert client.is_server_ready()


def test_unknown_outputs_are_refused(client: triton.InferenceServerClient) -> None:
    outputs = [triton.InferRequestedOutput("probabilities")]
    call = lambda: client.infer(MODEL_NAME, [fp32_input(tensor(1))], outputs=outputs, headers=AUTH)  # noqa: E731
    assert status_of(call) == "INVALID_ARGUMENT"


def test_tokens_are_required_as_over_rest(client: triton.InferenceServerClient) -> None:
    values = [fp32_input(tensor(1))]
    assert status_of(lambda: client.infer(MODEL_NAME, values)) == "UNAUTHENTICATED"
    wrong = {"authorization": "Bearer wrong-token-0123456789abcdef"}
    assert status_of(lambda: client.infer(MODEL_NAME, values, headers=wrong)) == "PERMISSION_DENIED"
    assert status_of(lambda: client.get_model_metadata(MODEL_NAME)) == "UNAUTHENTICATED"
    assert client.infer(MODEL_NAME, values, headers=ADMIN).as_numpy(OUTPUT).shape == (1, 3)  # admin opens all
    # CONVSERVE_TOKEN_HEADER, Triton's header-key style, carries a token as over REST.
    assert client.get_model_repository_index(headers={"admin-key": ADMIN_TOKEN}).models


def test_methods_the_service_does_not_implement_are_unimplemented(
    client: triton.InferenceServerClient,
) -> None:
    assert status_of(lambda: client.get_inference_statistics(headers=AUTH)) == "UNIMPLEMENTED"


# ---- model repository ------------------------------------------------------------------------------------


def test_repository_index_unload_and_load_with_the_admin_token(
    server: LiveServer, client: triton.InferenceServerClient
) -> None:
    index = client.get_model_repository_index(headers=ADMIN, as_json=True)["models"]
    rest = httpx.post(f"{server.url}/v2/repository/index", headers=ADMIN).json()
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        (m["name"], m["version"], m["state"]) for m in rest
    ]
    assert (index[0]["name"], index[0]["state"]) == (MODEL_NAME, "READY")

    assert status_of(lambda: client.unload_model(MODEL_NAME)) == "UNAUTHENTICATED"
    assert status_of(lambda: client.unload_model(MODEL_NAME, headers=AUTH)) == "PERMISSION_DENIED"
    assert status_of(lambda: client.get_model_repository_index(headers=AUTH)) == "PERMISSION_DENIED"
    assert client.is_model_ready(MODEL_NAME)

    try:
        client.unload_model(MODEL_NAME, headers=ADMIN)
        wait_until(lambda: not client.is_model_ready(MODEL_NAME), "the model unloaded")
        assert not client.is_server_ready()
        assert status_of(lambda: client.infer(MODEL_NAME, [fp32_input(tensor(1))], headers=AUTH)) in (
            "UNAVAILABLE",
            "NOT_FOUND",
        )
        assert status_of(lambda: client.load_model("nonexistent", headers=ADMIN)) == "NOT_FOUND"
        assert (
            status_of(lambda: client.load_model(MODEL_NAME, headers=ADMIN, config="{}")) == "INVALID_ARGUMENT"
        )
    finally:
        client.load_model(MODEL_NAME, headers=ADMIN)
    assert client.is_model_ready(MODEL_NAME)
    assert client.is_server_ready()


# ---- metrics and logs --------------------------------------------------------------------------------------


def test_metrics_and_the_access_log_record_grpc_calls(
    server: LiveServer, client: triton.InferenceServerClient, caplog: pytest.LogCaptureFixture
) -> None:

    def access_lines() -> list[str]:
        return [record.getMessage() for record in caplog.records if record.name == "service.access"]

    with caplog.at_level(logging.INFO, logger="service.access"):
        client.infer(MODEL_NAME, [fp32_input(tensor(1))], headers={**AUTH, "x-request-id": "grpc-logged-1"})
        with pytest.raises(InferenceServerException):
            client.infer(MODEL_NAME, [fp32_input(tensor(1)[:, :, :16])], headers=AUTH)
        # A refusal's line is written once its status has been sent, so it may follow the client's error.
        wait_until(
            lambda: any("status=INVALID_ARGUMENT" in line for line in access_lines()),
            "the access log line of the refused call",
        )
    text = httpx.get(f"{server.url}/metrics").text
    labels = 'protocol="grpc",endpoint="ModelInfer",model="tiny",version="1"'
    assert metric(text, f'convserve_requests_total{{{labels},status="200"}}') >= 1
    assert metric(text, f'convserve_requests_total{{{labels},status="422"}}') >= 1
    assert metric(text, f"convserve_request_duration_seconds_count{{{labels}}}") >= 2
    assert metric(text, 'convserve_requests_total{protocol="http",endpoint="/readyz"}') >= 1  # REST's too
    # A reply's line is written before the reply leaves, so it is there once the client has it.
    line = "request_id=grpc-logged-1 method=POST path=/inference.GRPCInferenceService/ModelInfer status=OK"
    assert any(entry.startswith(line) for entry in access_lines()), access_lines()


# ---- TLS ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, and a client key and certificate the CA signed."""
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1"), ca.issue_cert("client@example")
    files = {
        name: directory / f"{name}.pem" for name in ("ca", "server", "server_key", "client", "client_key")
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["server"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return files


def test_mutual_tls_serves_certified_clients_only_and_poll_mode_refuses_loads(
    model_repository: Path, pki: dict[str, Path]
) -> None:
    settings = tiny_settings(
        model_repository,
        tls_certfile=pki["server"],
        tls_keyfile=pki["server_key"],
        tls_client_ca=pki["ca"],
        admin_token=ADMIN_TOKEN,
    )
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
    with live_server(settings, grpc=True, client_options={"verify": context}) as server:
        certified = triton.InferenceServerClient(
            server.grpc_url,
            ssl=True,
            root_certificates=str(pki["ca"]),
            private_key=str(pki["client_key"]),
            certificate_chain=str(pki["client"]),
        )
        anonymous = triton.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(pki["ca"]))
        plain = triton.InferenceServerClient(server.grpc_url)
        try:
            assert certified.infer(MODEL_NAME, [fp32_input(tensor(1))]).as_numpy(OUTPUT).shape == (1, 3)
            for refused in (anonymous, plain):  # the handshake fails: no call reaches the service
                assert status_of(refused.is_server_live) == "UNAVAILABLE"
            # MODEL_CONTROL=poll (the default): the repository on disk decides, as over REST.
            with pytest.raises(InferenceServerException) as failure:
                certified.load_model(MODEL_NAME, headers=ADMIN)
            assert str(failure.value.status()) == "StatusCode.INVALID_ARGUMENT"
            assert "MODEL_CONTROL" in failure.value.message()
        finally:
            for client in (certified, anonymous, plain):
                client.close()


# ---- deadlines -------------------------------------------------------------------------------------------


def test_a_client_deadline_shorter_than_the_batchers_wait_ends_the_call_and_the_server_stays_ready(
    model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A lone row waits MAX_QUEUE_DELAY_MS for company before its batch runs: 6 s, far past the 0.5 s
    # deadline, so the deadline passes first whatever the machine's speed.
    settings = tiny_settings(model_repository, max_queue_delay_ms=6000.0, max_batch_size=4)

    def infer_statuses() -> list[str]:
        """The gRPC status of every ModelInfer access-log line so far."""
        path = "path=/inference.GRPCInferenceService/ModelInfer status="
        return [
            record.getMessage().split(path, 1)[1].split()[0]
            for record in caplog.records
            if record.name == "service.access" and path in record.getMessage()
        ]

    with live_server(settings, grpc=True) as server, caplog.at_level(logging.INFO, logger="service.access"):
        client = triton.InferenceServerClient(server.grpc_url)
        try:
            call = lambda: client.infer(MODEL_NAME, [fp32_input(tensor(1))], client_timeout=0.5)  # noqa: E731
            assert status_of(call) == "DEADLINE_EXCEEDED"
            wait_until(infer_statuses, "the call's access-log line")
            assert infer_statuses() == ["DEADLINE_EXCEEDED"]
            assert client.is_server_ready()
            # Triton's own `timeout` parameter (microseconds), without a gRPC deadline: the server ends
            # the call itself, with the status REST's 504 maps to.
            with pytest.raises(InferenceServerException) as failure:
                client.infer(MODEL_NAME, [fp32_input(tensor(1))], timeout=500_000)
            assert str(failure.value.status()) == "StatusCode.DEADLINE_EXCEEDED"
            assert "without reaching the model" in failure.value.message()  # the batcher dropped it
            assert client.is_server_ready()
        finally:
            client.close()


# ---- the memory budget -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "upload", "budget", "connections"),
    [
        (4 << 20, 64 << 20, 256 << 20, 512),  # the defaults
        (64 << 20, 64 << 20, 64 << 20, 512),
        (4 << 20, 1 << 20, 256 << 20, 16),
        (1024, 2048, 1 << 30, 512),
    ],
)
def test_messages_one_worker_can_hold_stay_within_the_body_budget(
    model_repository: Path, message: int, upload: int, budget: int, connections: int
) -> None:
    settings = tiny_settings(
        model_repository,
        grpc_max_message_bytes=message,
        max_upload_bytes=upload,
        max_body_bytes_in_flight=budget,
        max_connections=connections,
    )
    limit, calls = message_limit(settings), max_concurrent_calls(settings)
    assert limit == min(message, upload)
    assert 1 <= calls <= connections
    assert limit * calls <= budget


def test_a_message_over_the_grpc_limit_is_refused_before_the_service_sees_it(model_repository: Path) -> None:
    settings = tiny_settings(model_repository, grpc_max_message_bytes=32 * 1024, max_upload_bytes=1 << 20)
    photo = jpeg("astronaut")
    assert 32 * 1024 < len(photo) < 1 << 20
    with live_server(settings, grpc=True) as live:
        client = triton.InferenceServerClient(url=live.grpc_url)
        try:
            image = triton.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(np.array([photo], dtype=np.object_))
            with pytest.raises(InferenceServerException) as refused:
                client.infer(MODEL_NAME, [image])
            assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            small = triton.InferInput("image", [1], "BYTES")
            small.set_data_from_numpy(np.array([jpeg("coffee", quality=10)], dtype=np.object_))
            assert client.infer(MODEL_NAME, [small]).as_numpy(OUTPUT).shape == (1, 3)
        finally:
            client.close()
