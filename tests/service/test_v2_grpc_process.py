"""The gRPC server as a whole process shows it: TLS, several workers, client deadlines, SIGTERM under load."""

from __future__ import annotations

import re
import signal
import ssl
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import trustme
from tritonclient.utils import InferenceServerException

from tests.liveserver import ServiceProcess, run_service, service_env, service_process
from tests.tinymodel import MODEL_NAME
from tests.waiting import wait_until

ADMIN_TOKEN = "admin-token-0123456789abcdef0123"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
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


# ---- TLS -------------------------------------------------------------------------------------------------


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
    model_repository: Path, pki: dict[str, Path], tmp_path: Path
) -> None:
    env = service_env(
        model_repository,
        TLS_CERTFILE=str(pki["server"]),
        TLS_KEYFILE=str(pki["server_key"]),
        TLS_CLIENT_CA=str(pki["ca"]),
        ADMIN_TOKEN=ADMIN_TOKEN,
    )
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
    with service_process(
        env, log_path=tmp_path / "service.log", client_options={"verify": context}
    ) as server:
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
            assert certified.infer(MODEL_NAME, one_row()).as_numpy("logits").shape == (1, 3)
            for refused in (anonymous, plain):  # the handshake fails: no call reaches the service
                with pytest.raises(InferenceServerException) as failure:
                    refused.is_server_live()
                assert status(failure.value) == "UNAVAILABLE"
            # MODEL_CONTROL=poll (the default): the repository on disk decides, as over REST.
            with pytest.raises(InferenceServerException) as failure:
                certified.load_model(MODEL_NAME, headers=ADMIN)
            assert status(failure.value) == "INVALID_ARGUMENT"
            assert "MODEL_CONTROL" in failure.value.message()
        finally:
            for client in (certified, anonymous, plain):
                client.close()


# ---- deadlines -------------------------------------------------------------------------------------------


def test_a_client_deadline_shorter_than_the_batchers_wait_ends_the_call_and_the_server_stays_ready(
    model_repository: Path, tmp_path: Path
) -> None:
    # A lone row waits MAX_QUEUE_DELAY_MS for company before its batch runs: 6 s, far past the 0.5 s
    # deadline, so the deadline passes first whatever the machine's speed.
    env = service_env(model_repository, MAX_QUEUE_DELAY_MS="6000", MAX_BATCH_SIZE="4")
    with service_process(env, log_path=tmp_path / "service.log") as server:
        client = triton.InferenceServerClient(server.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as failure:
                client.infer(MODEL_NAME, one_row(), client_timeout=0.5)
            assert status(failure.value) == "DEADLINE_EXCEEDED"
            wait_until(lambda: infer_lines(server), "the call's access-log line")
            assert [code for _, code in infer_lines(server)] == ["DEADLINE_EXCEEDED"]
            assert client.is_server_ready()
            # Triton's own `timeout` parameter (microseconds), without a gRPC deadline: the server ends
            # the call itself, with the status REST's 504 maps to.
            with pytest.raises(InferenceServerException) as failure:
                client.infer(MODEL_NAME, one_row(), timeout=500_000)
            assert status(failure.value) == "DEADLINE_EXCEEDED"
            assert "without reaching the model" in failure.value.message()  # the batcher dropped it
            assert client.is_server_ready()
        finally:
            client.close()


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
