"""The gRPC server as only a whole process shows it: several workers on one port, a port another server
holds, SIGTERM under load. Everything else runs in-process (tests/service/test_v2_grpc.py)."""

from __future__ import annotations

import re
import signal
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.liveserver import ServiceProcess, run_service, service_env, service_process
from tests.tinymodel import MODEL_NAME
from tests.waiting import wait_until

ROW = (1, 3, 32, 32)


def one_row() -> list[triton.InferInput]:
    entry = triton.InferInput("input", list(ROW), "FP32")
    entry.set_data_from_numpy(np.zeros(ROW, dtype=np.float32))
    return [entry]


def status(error: InferenceServerException) -> str:
    return str(error.status()).removeprefix("StatusCode.")


def infer_lines(server: ServiceProcess) -> list[tuple[str, str]]:
    """(worker pid, gRPC status) of every ModelInfer access-log line so far."""
    pattern = r"\[(\d+)\] service\.access: .*path=/inference\.GRPCInferenceService/ModelInfer status=(\w+)"
    return re.findall(pattern, server.log())


# ---- several workers ---------------------------------------------------------------------------------------


def test_every_worker_serves_grpc_on_the_shared_port(model_repository: Path, tmp_path: Path) -> None:
    env = service_env(model_repository, WORKERS="2")
    with service_process(env, log_path=tmp_path / "service.log") as server:

        def both_workers_answered() -> bool:
            client = triton.InferenceServerClient(server.grpc_url)  # a new connection each time
            try:
                assert client.infer(MODEL_NAME, one_row()).as_numpy("logits").shape == (1, 3)
            finally:
                client.close()
            return len({pid for pid, _ in infer_lines(server)}) == 2

        wait_until(both_workers_answered, "calls answered by both workers", timeout_s=60)
        assert {code for _, code in infer_lines(server)} == {"OK"}


def test_a_single_worker_does_not_share_a_grpc_port_another_server_holds(
    model_repository: Path, tmp_path: Path
) -> None:
    with service_process(service_env(model_repository), log_path=tmp_path / "service.log") as server:
        second = run_service(service_env(model_repository, GRPC_PORT=str(server.grpc_port)))
        assert second.returncode != 0
        assert f"cannot listen for gRPC on 127.0.0.1:{server.grpc_port}" in second.stdout + second.stderr
        client = triton.InferenceServerClient(server.grpc_url)
        try:
            assert client.is_server_ready()
        finally:
            client.close()


# ---- graceful shutdown ------------------------------------------------------------------------------------


def test_sigterm_under_grpc_load_loses_no_admitted_call(model_repository: Path, tmp_path: Path) -> None:
    env = service_env(model_repository, MAX_BATCH_SIZE="4", MAX_QUEUE_SIZE="64")
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    with service_process(env, log_path=tmp_path / "service.log") as server:

        def load() -> None:
            """Calls back to back until one is refused (the server has stopped taking calls)."""
            client = triton.InferenceServerClient(server.grpc_url)
            try:
                while True:
                    try:
                        client.infer(MODEL_NAME, one_row(), client_timeout=30)
                    except InferenceServerException as error:
                        with lock:
                            outcomes[status(error)] += 1
                        return
                    with lock:
                        outcomes["OK"] += 1
            finally:
                client.close()

        threads = [threading.Thread(target=load, name=f"grpc-load-{i}") for i in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: outcomes["OK"] >= 40, "40 calls answered under load")
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert server.wait(timeout_s=60) == 0, server.log()
    # Every call the service admitted was answered, and the client received that answer: the log's
    # OK lines are exactly the client's successes; every other call was refused, UNAVAILABLE.
    logged = Counter(code for _, code in infer_lines(server))
    assert set(outcomes) == {"OK", "UNAVAILABLE"}, outcomes
    assert logged["OK"] == outcomes["OK"], (logged, outcomes)
    assert set(logged) <= {"OK", "UNAVAILABLE"}, logged
    assert "gRPC: draining" in server.log()
    assert "gRPC: stopped" in server.log()
