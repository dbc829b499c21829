"""End to end: the real server on a free port, real HTTP clients, `tritonclient.http`, signals."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.models import registry
from service.models.runtime import load_model
from service.settings import Settings
from service.transport import middleware
from tests.liveserver import LiveServer, live_server, run_service, service_env, service_process
from tests.photos import jpeg
from tests.service.promtext import metric
from tests.tinymodel import MODEL_NAME, tiny_settings, zero_inputs
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def server(model_repository: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(model_repository, max_batch_size=8, max_queue_size=64, max_queue_delay_ms=10)
    with live_server(settings) as live:
        yield live


def test_predict_over_real_http_names_the_model_and_ranks_labels(server: LiveServer) -> None:
    response = httpx.post(
        f"{server.url}/predict", files={"photo": ("cat.jpg", jpeg("chelsea"), "image/jpeg")}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == {"name": MODEL_NAME, "version": 1}
    scores = [p["score"] for p in body["predictions"][0]]
    assert scores == sorted(scores, reverse=True)


def test_tritonclient_gets_the_same_top1_as_predict_for_the_same_tensor(
    server: LiveServer, triton_client: Callable[[LiveServer], triton.InferenceServerClient]
) -> None:
    tensor = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    predicted = httpx.post(f"{server.url}/predict?top_k=1", json={"inputs": tensor.tolist()}).json()
    predict_top1 = [ranked[0]["index"] for ranked in predicted["predictions"]]

    client = triton_client(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    metadata = client.get_model_metadata(MODEL_NAME)
    assert metadata["inputs"][0]["shape"] == [-1, 3, 32, 32]
    infer_input = triton.InferInput("input", list(tensor.shape), "FP32")
    infer_input.set_data_from_numpy(tensor, binary_data=True)
    binary = client.infer(MODEL_NAME, [infer_input])  # no outputs named: all come back binary
    logits = binary.as_numpy("logits")
    assert list(logits.argmax(axis=1)) == predict_top1

    json_input = triton.InferInput("input", list(tensor.shape), "FP32")
    json_input.set_data_from_numpy(tensor, binary_data=False)
    outputs = [triton.InferRequestedOutput("logits", binary_data=False)]
    as_json = client.infer(MODEL_NAME, [json_input], model_version="1", outputs=outputs, request_id="r-7")
    np.testing.assert_allclose(as_json.as_numpy("logits"), logits, atol=1e-5)
    assert as_json.get_response()["id"] == "r-7"

    compressed = client.infer(MODEL_NAME, [infer_input], request_compression_algorithm="gzip")
    np.testing.assert_allclose(compressed.as_numpy("logits"), logits, atol=1e-5)

    classes = client.infer(
        MODEL_NAME, [infer_input], outputs=[triton.InferRequestedOutput("logits", class_count=1)]
    )
    labels = [int(entry.decode().split(":")[1]) for entry in classes.as_numpy("logits").ravel()]
    assert labels == predict_top1


def test_tritonclient_errors_carry_the_servers_message(
    server: LiveServer, triton_client: Callable[[LiveServer], triton.InferenceServerClient]
) -> None:
    client = triton_client(server)
    wrong = triton.InferInput("input", [1, 3, 16, 16], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(InferenceServerException, match=r"expected a tensor of shape \[N, 3, 32, 32\]"):
        client.infer(MODEL_NAME, [wrong])
    assert client.is_server_ready()


def test_192_requests_from_32_concurrent_clients_all_succeed_in_shared_batches(server: LiveServer) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    upload = jpeg("coffee")

    async def one_client(client: httpx.AsyncClient) -> list[int]:
        statuses = []
        for _ in range(6):
            response = await client.post("/predict", files={"image": ("coffee.jpg", upload, "image/jpeg")})
            statuses.append(response.status_code)
        return statuses

    async def load() -> list[int]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            results = await asyncio.gather(*(one_client(client) for _ in range(32)))
        return [status for statuses in results for status in statuses]

    statuses = asyncio.run(load())
    assert statuses == [200] * 192
    after = httpx.get(f"{server.url}/metrics").text
    runs = metric(after, "convserve_batch_size_count") - metric(before, "convserve_batch_size_count")
    images = metric(after, "convserve_batch_size_sum") - metric(before, "convserve_batch_size_sum")
    assert images == 192
    assert images / runs > 1, f"mean batch size {images / runs:.2f}: no dynamic batching under load"


def test_full_queue_answers_503_with_retry_after_over_http(make_settings: Callable[..., Settings]) -> None:
    # A one-second batching delay keeps 3 of 4 queue slots busy; 2 more images cannot fit.
    settings = make_settings(max_batch_size=4, max_queue_size=4, max_queue_delay_ms=1000)
    tensor = zero_inputs(3)
    with live_server(settings) as live, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, f"{live.url}/predict", json={"inputs": tensor}, timeout=30)
        wait_until(lambda: queue_depth(live.url) == 3, "the first request's 3 images reaching the queue")
        refused = httpx.post(f"{live.url}/predict", json={"inputs": tensor[:2]})
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["error"]
        assert waiting.result().status_code == 200
        text = httpx.get(f"{live.url}/metrics").text
        assert metric(text, 'convserve_rejected_total{reason="queue_full"}') == 1


def test_client_deadline_passing_in_the_queue_gets_504_before_compute(
    make_settings: Callable[..., Settings],
    triton_client: Callable[[LiveServer], triton.InferenceServerClient],
) -> None:
    # Triton's per-request timeout (1 ms) expires during the 300 ms batching delay.
    settings = make_settings(max_batch_size=4, max_queue_delay_ms=300)
    with live_server(settings) as live:
        client = triton_client(live)
        infer_input = triton.InferInput("input", [1, 3, 32, 32], "FP32")
        infer_input.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        with pytest.raises(InferenceServerException) as timed_out:
            client.infer(MODEL_NAME, [infer_input], timeout=1000)
        assert timed_out.value.status() == "504"
        text = httpx.get(f"{live.url}/metrics").text
        assert metric(text, 'convserve_rejected_total{reason="timeout"}') == 1
        assert metric(text, "convserve_batch_size_count") == 0  # never reached the model
        assert client.is_server_ready()


def queue_depth(url: str) -> float:
    return metric(httpx.get(f"{url}/metrics").text, "convserve_queue_depth")


def test_sigterm_finishes_accepted_requests_refuses_stalled_uploads_and_exits_0(
    model_repository: Path, tmp_path: Path
) -> None:
    # Body and request timeouts of a minute: only the drain can end the stalled upload before that.
    timeouts = {"BODY_TIMEOUT_S": "60", "REQUEST_TIMEOUT_S": "60"}
    env = service_env(model_repository, MAX_BATCH_SIZE="8", MAX_QUEUE_DELAY_MS="1500", **timeouts)
    with service_process(env, log_path=tmp_path / "service.log") as server, ThreadPoolExecutor(3) as pool:
        upload = {"image": ("cat.jpg", jpeg("chelsea"), "image/jpeg")}
        pending = [
            pool.submit(httpx.post, f"{server.url}/predict", files=upload, timeout=30) for _ in range(3)
        ]
        # The 1.5 s batching delay holds them there while the stalled upload starts and SIGTERM arrives.
        wait_until(lambda: queue_depth(server.url) == 3, "all three uploads reaching the queue")
        with socket.create_connection((server.host, server.port), timeout=30) as stalled:
            stalled.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: 100000\r\n\r\n"
            )
            # uvicorn sends 100 Continue when the app first asks for the body: it is reading it now.
            assert stalled.recv(65536).startswith(b"HTTP/1.1 100")
            stalled.sendall(b'{"inputs": ')
            server.process.send_signal(signal.SIGTERM)
            assert [future.result().status_code for future in pending] == [200, 200, 200]
            refused = stalled.recv(65536)
        status = server.wait(timeout_s=30)
    assert refused.startswith(b"HTTP/1.1 503"), refused
    assert b"shutting down" in refused
    assert status == 0, server.log()
    assert "stopped" in server.log()


def test_two_workers_serve_and_every_scrape_counts_the_whole_process_group(
    model_repository: Path, tmp_path: Path
) -> None:
    predict = 'convserve_requests_total{endpoint="/predict",status="200"}'
    env = service_env(model_repository, WORKERS="2")
    with service_process(env, log_path=tmp_path / "service.log") as server:
        upload = {"image": ("cat.jpg", jpeg("chelsea"), "image/jpeg")}
        for _ in range(60):  # a new connection each time, accepted by whichever worker is free
            with httpx.Client() as client:
                assert client.post(f"{server.url}/predict", files=upload).status_code == 200
        for _ in range(10):
            with httpx.Client() as client:
                text = client.get(f"{server.url}/metrics").text
            assert metric(text, predict) == 60
            assert metric(text, "convserve_batch_size_sum") == 60
            assert metric(text, "convserve_queue_depth") == 0
            info = [line for line in text.splitlines() if line.startswith("convserve_model_info{")]
            assert len(info) == 1, info  # one series per model, not one per worker
        server.process.send_signal(signal.SIGTERM)
        status = server.wait(timeout_s=60)
    log = server.log()
    assert status == 0, log
    loaded = rf"\[(\d+)\] {re.escape(registry.logger.name)}: model tiny version 1 loaded"
    workers = set(re.findall(loaded, log))
    access = (
        rf"\[(\d+)\] {re.escape(middleware.logger.name)}: request_id=\S+ method=POST path=/predict status=200"
    )
    served = re.findall(access, log)
    # Which worker accepts a connection is the kernel's choice (usually both serve; the split varies),
    # so the aggregation itself is proven deterministically in test_metrics_multiprocess.py.
    assert len(workers) == 2 and len(served) == 60 and set(served) <= workers, log


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"MAX_BATCH_SIZE": "64", "MAX_QUEUE_SIZE": "8"}, "CONVSERVE_MAX_QUEUE_SIZE"),
        ({"MODEL_NAME": "missing"}, "model 'missing'"),
        ({"REQUIRE_GPU": "true", "PROVIDERS": "cpu"}, "REQUIRE_GPU"),
    ],
    ids=["queue-smaller-than-batch", "unknown-model", "gpu-required-without-gpu-provider"],
)
def test_python_m_service_refuses_bad_configuration_with_exit_2(
    model_repository: Path, variables: dict[str, str], message: str
) -> None:
    result = run_service(service_env(model_repository, **variables))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_require_gpu_on_a_cpu_only_machine_refuses_to_start_with_orts_reason(
    model_repository: Path, tiny_model_path: Path
) -> None:
    if load_model(tiny_model_path, ["CUDAExecutionProvider", "CPUExecutionProvider"]).on_gpu:
        pytest.skip("a GPU is active here")
    result = run_service(service_env(model_repository, REQUIRE_GPU="true", PROVIDERS="cuda,cpu"))
    assert result.returncode != 0
    assert "REQUIRE_GPU=true but ONNX Runtime is running on CPUExecutionProvider" in result.stderr
    assert "ONNX Runtime said:" in result.stderr
