"""End to end: the real server on a free port, real HTTP clients, `tritonclient.http`, signals."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.models.runtime import load_model
from service.settings import Settings
from tests.service.conftest import MODEL_NAME, LiveServer, live_server
from tests.service.photos import jpeg
from tests.service.promtext import metric
from tests.tinymodel import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(model_repository: Path) -> Iterator[LiveServer]:
    settings = Settings(
        model_repository=model_repository,
        providers=["cpu"],
        max_batch_size=8,
        max_queue_size=64,
        max_queue_delay_ms=10,
        intra_op_threads=1,
    )
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


def test_tritonclient_gets_the_same_top1_as_predict_for_the_same_tensor(server: LiveServer) -> None:
    tensor = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    predicted = httpx.post(f"{server.url}/predict?top_k=1", json={"inputs": tensor.tolist()}).json()
    predict_top1 = [ranked[0]["index"] for ranked in predicted["predictions"]]

    client = triton.InferenceServerClient(url=f"{server.host}:{server.port}")
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


def test_tritonclient_errors_carry_the_servers_message(server: LiveServer) -> None:
    client = triton.InferenceServerClient(url=f"{server.host}:{server.port}")
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
    tensor = np.zeros((3, 3, 32, 32), np.float32).tolist()
    with live_server(settings) as live, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, f"{live.url}/predict", json={"inputs": tensor}, timeout=30)
        deadline = time.monotonic() + 10
        while metric(httpx.get(f"{live.url}/metrics").text, "convserve_queue_depth") < 3:
            assert time.monotonic() < deadline, "the first request never reached the queue"
            time.sleep(0.01)
        refused = httpx.post(f"{live.url}/predict", json={"inputs": tensor[:2]})
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["error"]
        assert waiting.result().status_code == 200
        text = httpx.get(f"{live.url}/metrics").text
        assert metric(text, 'convserve_rejected_total{reason="queue_full"}') == 1


def test_client_deadline_passing_in_the_queue_gets_504_before_compute(
    make_settings: Callable[..., Settings],
) -> None:
    # Triton's per-request timeout (1 ms) expires during the 300 ms batching delay.
    settings = make_settings(max_batch_size=4, max_queue_delay_ms=300)
    with live_server(settings) as live:
        client = triton.InferenceServerClient(url=f"{live.host}:{live.port}")
        infer_input = triton.InferInput("input", [1, 3, 32, 32], "FP32")
        infer_input.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        with pytest.raises(InferenceServerException) as timed_out:
            client.infer(MODEL_NAME, [infer_input], timeout=1000)
        assert timed_out.value.status() == "504"
        text = httpx.get(f"{live.url}/metrics").text
        assert metric(text, 'convserve_rejected_total{reason="timeout"}') == 1
        assert metric(text, "convserve_batch_size_count") == 0  # never reached the model
        assert client.is_server_ready()


def service_env(model_repository: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    env.update({"CONVSERVE_MODEL_REPOSITORY": str(model_repository), "CONVSERVE_PROVIDERS": "cpu"})
    env.update({f"CONVSERVE_{name}": value for name, value in variables.items()})
    return env


@contextmanager
def service_process(model_repository: Path, **variables: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python -m service` in a subprocess on a free port, ready; killed if still running at the end."""
    port = free_port()
    env = service_env(model_repository, PORT=str(port), HOST="127.0.0.1", **variables)
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=REPO_ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a failed test kills the workers too
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[1]
            with suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.1)
        yield process, url
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_sigterm_finishes_accepted_requests_refuses_stalled_uploads_and_exits_0(
    model_repository: Path,
) -> None:
    # Body and request timeouts of a minute: only the drain can end the stalled upload before that.
    timeouts = {"BODY_TIMEOUT_S": "60", "REQUEST_TIMEOUT_S": "60"}
    with (
        service_process(model_repository, MAX_BATCH_SIZE="8", MAX_QUEUE_DELAY_MS="1500", **timeouts) as (
            process,
            url,
        ),
        ThreadPoolExecutor(3) as pool,
    ):
        upload = {"image": ("cat.jpg", jpeg("chelsea"), "image/jpeg")}
        pending = [pool.submit(httpx.post, f"{url}/predict", files=upload, timeout=30) for _ in range(3)]
        while metric(httpx.get(f"{url}/metrics").text, "convserve_queue_depth") < 3:
            time.sleep(0.01)  # all three are queued, held by the 1.5 s batching delay
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
            stalled.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: 100000\r\n\r\n"
            )
            # uvicorn sends 100 Continue when the app first asks for the body: it is reading it now.
            assert stalled.recv(65536).startswith(b"HTTP/1.1 100")
            stalled.sendall(b'{"inputs": ')
            process.send_signal(signal.SIGTERM)
            assert [future.result().status_code for future in pending] == [200, 200, 200]
            refused = stalled.recv(65536)
        _, log = process.communicate(timeout=30)
    assert refused.startswith(b"HTTP/1.1 503"), refused
    assert b"shutting down" in refused
    assert process.returncode == 0, log
    assert "stopped" in log


def test_two_workers_serve_and_every_scrape_counts_the_whole_process_group(model_repository: Path) -> None:
    predict = 'convserve_requests_total{endpoint="/predict",status="200"}'
    with service_process(model_repository, WORKERS="2") as (process, url):
        upload = {"image": ("cat.jpg", jpeg("chelsea"), "image/jpeg")}
        for _ in range(60):  # a new connection each time, accepted by whichever worker is free
            with httpx.Client() as client:
                assert client.post(f"{url}/predict", files=upload).status_code == 200
        for _ in range(10):
            with httpx.Client() as client:
                text = client.get(f"{url}/metrics").text
            assert metric(text, predict) == 60
            assert metric(text, "convserve_batch_size_sum") == 60
            assert metric(text, "convserve_queue_depth") == 0
            info = [line for line in text.splitlines() if line.startswith("convserve_model_info{")]
            assert len(info) == 1, info  # one series per model, not one per worker
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=60)
    assert process.returncode == 0, log
    workers = set(re.findall(r"\[(\d+)\] service\.registry: model tiny version 1 loaded", log))
    served = re.findall(
        r"\[(\d+)\] service\.access: request_id=\S+ method=POST path=/predict status=200", log
    )
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
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=REPO_ROOT,
        env=service_env(model_repository, PORT=str(free_port()), **variables),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_require_gpu_on_a_cpu_only_machine_refuses_to_start_with_orts_reason(
    model_repository: Path, tiny_model_path: Path
) -> None:
    if load_model(tiny_model_path, ["CUDAExecutionProvider", "CPUExecutionProvider"]).on_gpu:
        pytest.skip("a GPU is active here")
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=REPO_ROOT,
        env=service_env(model_repository, PORT=str(free_port()), REQUIRE_GPU="true", PROVIDERS="cuda,cpu"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "REQUIRE_GPU=true but ONNX Runtime is running on CPUExecutionProvider" in result.stderr
    assert "ONNX Runtime said:" in result.stderr
