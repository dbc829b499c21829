"""CONVSERVE_MEMORY_BUDGET_MB: loaded versions fit the budget, the least recently used idle one makes
room, a request for an unloaded version loads it (once, however many ask), a version in use is never
unloaded, and a version bigger than the whole budget is refused with 507.

The models are the tiny imported classifier plus 8 MiB of weights that ONNX Runtime folds away at load
(a constant reduced to zero and added to the logits): each one's measured cost is then its file's
size, the floor of every cost, so the test knows what each version takes. With a budget of 20 MiB two
of them fit (16 MiB) and a third never does.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton_grpc
from onnx import helper, numpy_helper
from tritonclient.utils import InferenceServerException

from convserve.importer import ImportRequest, import_model
from tests.convserve.graphs import classifier
from tests.liveserver import LiveServer, live_server
from tests.service.promtext import metric
from tests.tinymodel import tiny_settings
from tests.waiting import wait_until

MIB = 1024 * 1024
BUDGET_MB = 20
BALLAST_MB = 8
SIZE = 24  # the tiny classifier's input side
NAMES = ("m0", "m1", "m2", "m3")


def ballast_model(repository: Path, name: str, megabytes: int, seed: int = 0) -> Path:
    """`repository/name/1/model.onnx`: the tiny classifier carrying `megabytes` of folded-away weights."""
    model = classifier(size=SIZE, seed=seed)
    graph = model.graph
    values = np.random.default_rng(seed).normal(size=megabytes * MIB // 4).astype(np.float32)
    graph.initializer.extend(
        [numpy_helper.from_array(values, "ballast"), numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
    )
    output = graph.node[-1]  # Identity(logits) -> the graph's output
    graph.node.insert(len(graph.node) - 1, helper.make_node("ReduceMax", ["ballast"], ["peak"], keepdims=1))
    graph.node.insert(len(graph.node) - 1, helper.make_node("Mul", ["peak", "zero"], ["nothing"]))
    graph.node.insert(len(graph.node) - 1, helper.make_node("Add", [output.input[0], "nothing"], ["sum"]))
    output.input[0] = "sum"
    source = repository.parent / f"{name}.source.onnx"
    onnx.save(model, source)
    labels = repository.parent / "labels.txt"
    labels.write_text("a\nb\nc\n")
    return import_model(ImportRequest(model=source, name=name, labels=labels, repository=repository)).path


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("budget") / "models"
    for seed, name in enumerate(NAMES):
        ballast_model(root, name, BALLAST_MB, seed)
    return root


@pytest.fixture
def live(repository: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(repository, memory_budget_mb=BUDGET_MB, body_timeout_s=30, repository_poll_s=0.2)
    with live_server(settings) as server:
        yield server


def npy_batch() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1, 3, SIZE, SIZE), dtype=np.float32))
    return buffer.getvalue()


def predict(live: LiveServer, name: str) -> httpx.Response:
    return httpx.post(
        f"{live.url}/predict",
        params={"model": name},
        content=npy_batch(),
        headers={"content-type": "application/x-npy"},
        timeout=60,
    )


def readyz(live: LiveServer) -> dict[str, object]:
    response = httpx.get(f"{live.url}/readyz")
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def loaded(live: LiveServer) -> set[str]:
    models = readyz(live)["models"]
    assert isinstance(models, dict)
    return set(models)


def metrics_text(live: LiveServer) -> str:
    return httpx.get(f"{live.url}/metrics").text


def accounted_mib(live: LiveServer) -> float:
    """The sum of `convserve_model_memory_bytes` over loaded versions, in MiB."""
    return metric(metrics_text(live), "convserve_model_memory_bytes") / MIB


def index_states(live: LiveServer) -> dict[str, str]:
    entries = httpx.post(f"{live.url}/v2/repository/index").json()
    return {entry["name"]: entry["state"] for entry in entries}


class HeldRequest:
    """A /predict whose body is sent but for its last bytes: the request holds its model version."""

    def __init__(self, live: LiveServer, name: str) -> None:
        self.body = npy_batch()
        self.sock = socket.create_connection((live.host, live.port), timeout=60)
        self.sock.sendall(
            f"POST /predict?model={name} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n".encode()
            + self.body[:-16]
        )

    def finish(self) -> tuple[int, dict[str, object]]:
        self.sock.sendall(self.body[-16:])
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(
            next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if b"content-length" in line)
        )
        while len(body) < length:
            body += self.sock.recv(65536)
        self.sock.close()
        return int(head.split(b" ")[1]), json.loads(body)


def held_body_bytes(live: LiveServer) -> float:
    return metric(metrics_text(live), "convserve_request_body_bytes")


def wait_held(live: LiveServer, requests: int) -> None:
    """Until `requests` held requests are inside the route (their bodies read but for the last bytes)."""
    expected = requests * (len(npy_batch()) - 16)
    wait_until(lambda: held_body_bytes(live) >= expected, f"{requests} held requests reached their model")


def test_what_does_not_fit_loads_on_demand_and_the_least_recently_used_idle_version_makes_room(
    live: LiveServer,
) -> None:
    # Start-up loads what fits, in name order; the rest waits for a request.
    body = readyz(live)
    assert body["models"] == {"m0": [1], "m1": [1]}
    assert body["loadable"] == {"m2": [1], "m3": [1]}
    assert body["evicted"] == {}
    assert body["memory"] == {"budget_mb": BUDGET_MB, "used_mb": 2 * BALLAST_MB}
    assert index_states(live) == {"m0": "READY", "m1": "READY", "m2": "LOADABLE", "m3": "LOADABLE"}
    # A loadable version is ready to V2 clients: a request for it is served.
    assert httpx.get(f"{live.url}/v2/models/m2/ready").status_code == 200

    assert predict(live, "m1").status_code == 200
    assert predict(live, "m0").status_code == 200  # m1 is now the least recently used
    response = predict(live, "m2")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == {"name": "m2", "version": 1}
    assert loaded(live) == {"m0", "m2"}
    assert readyz(live)["evicted"] == {"m1": [1]}
    assert index_states(live)["m1"] == "EVICTED"
    assert accounted_mib(live) <= BUDGET_MB

    assert predict(live, "m1").status_code == 200  # back on demand: m0 (least recent) makes room now
    assert loaded(live) == {"m1", "m2"}
    text = metrics_text(live)
    assert metric(text, 'convserve_model_evictions_total{model="m1"}') == 1
    assert metric(text, 'convserve_model_evictions_total{model="m0"}') == 1
    assert metric(text, "convserve_memory_budget_bytes") == BUDGET_MB * MIB
    assert metric(text, 'convserve_model_info{model="m0",state="EVICTED"}') == 1
    assert accounted_mib(live) <= BUDGET_MB


def test_concurrent_requests_for_an_unloaded_version_share_one_load(live: LiveServer) -> None:
    assert "m3" not in loaded(live)
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(predict(live, "m3"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [response.status_code for response in results] == [200] * 8
    assert metric(metrics_text(live), 'convserve_model_loads_total{model="m3",result="success"}') == 1
    # Each of them waited for the load, and says so; a request for a loaded version does not.
    assert all(response.headers["server-timing"].startswith("load;dur=") for response in results)
    assert "server-timing" not in predict(live, "m3").headers
    assert accounted_mib(live) <= BUDGET_MB


def test_a_version_in_use_is_never_unloaded_and_a_load_waits_until_one_is_idle(live: LiveServer) -> None:
    assert loaded(live) == {"m0", "m1"}
    # m0 is held by a request in progress and is the least recently used version: m1 is used after it.
    held_m0 = HeldRequest(live, "m0")
    wait_held(live, 1)
    assert predict(live, "m1").status_code == 200
    assert predict(live, "m2").status_code == 200  # the idle m1 makes room, not m0
    assert loaded(live) == {"m0", "m2"}
    status, answer = held_m0.finish()
    assert status == 200 and answer["model"] == {"name": "m0", "version": 1}

    # Both loaded versions in use: a request for a third waits for one to finish, then is served.
    held = [HeldRequest(live, "m0"), HeldRequest(live, "m2")]
    wait_held(live, 2)
    waiting: list[httpx.Response] = []
    request = threading.Thread(target=lambda: waiting.append(predict(live, "m3")))
    request.start()
    wait_until(lambda: "waiting for room" in index_reason(live, "m3"), "the load of m3 to wait for room")
    assert loaded(live) == {"m0", "m2"}  # nothing held was unloaded for it
    status, _ = held[0].finish()  # m0 goes idle: it makes room
    assert status == 200
    request.join(60)
    assert waiting and waiting[0].status_code == 200, waiting
    assert loaded(live) == {"m2", "m3"}
    status, answer = held[1].finish()
    assert status == 200 and answer["model"] == {"name": "m2", "version": 1}


def index_reason(live: LiveServer, name: str) -> str:
    entries = httpx.post(f"{live.url}/v2/repository/index").json()
    return " ".join(entry["reason"] for entry in entries if entry["name"] == name)


def test_a_version_larger_than_the_whole_budget_gets_507_over_rest_and_grpc(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tiny_settings(repository, memory_budget_mb=BUDGET_MB, repository_poll_s=0.2)
    with live_server(settings, grpc=True) as live:
        ballast_model(repository, "huge", BUDGET_MB + 4, seed=9)  # appears while serving (poll mode)
        try:
            wait_until(lambda: "memory budget" in index_reason(live, "huge"), "the poll to refuse huge")
            response = predict(live, "huge")
            assert response.status_code == 507
            error = response.json()["error"]
            assert "more than the whole memory budget of 20 MB" in error and "MEMORY_BUDGET_MB" in error
            input_name = httpx.get(f"{live.url}/v2/models/m0").json()["inputs"][0]["name"]
            with triton_grpc.InferenceServerClient(live.grpc_url) as client:
                inputs = triton_grpc.InferInput(input_name, [1, 3, SIZE, SIZE], "FP32")
                inputs.set_data_from_numpy(np.zeros((1, 3, SIZE, SIZE), dtype=np.float32))
                with pytest.raises(InferenceServerException) as refused:
                    client.infer("huge", [inputs])
            assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert readyz(live)["models"] == {"m0": [1], "m1": [1]}  # nothing was evicted for it
            assert any("huge version 1 cannot be loaded" in record.getMessage() for record in caplog.records)
        finally:
            (repository / "huge" / "1" / "model.onnx").unlink()


def test_an_explicit_load_makes_room_and_an_unload_frees_it(repository: Path) -> None:
    settings = tiny_settings(
        repository, memory_budget_mb=BUDGET_MB, model_control="explicit", unsafe_unauthenticated_admin=True
    )
    with live_server(settings) as live:
        assert loaded(live) == {"m0", "m1"}
        assert predict(live, "m0").status_code == 200  # m1 is now the least recently used
        assert httpx.post(f"{live.url}/v2/repository/models/m3/load").status_code == 200
        assert loaded(live) == {"m0", "m3"} and readyz(live)["evicted"] == {"m1": [1]}
        assert httpx.post(f"{live.url}/v2/repository/models/m0/unload").status_code == 200
        assert round(accounted_mib(live)) == BALLAST_MB  # m3 alone
        # An unloaded model is not loaded again on demand: explicit control decides.
        assert predict(live, "m0").status_code == 503


def test_versions_of_one_model_are_budgeted_and_loaded_on_demand_each_on_its_own(tmp_path: Path) -> None:
    root = tmp_path / "models"
    ballast_model(root, "pets", BALLAST_MB, seed=1)
    second = root / "pets" / "2"
    second.mkdir()
    (second / "model.onnx").write_bytes(
        ballast_model(tmp_path / "other", "pets", BALLAST_MB, seed=2).read_bytes()
    )
    ballast_model(root, "zoo", BALLAST_MB, seed=3)
    settings = tiny_settings(root, memory_budget_mb=BUDGET_MB, version_policy="all", instances=2)
    with live_server(settings) as live:
        assert readyz(live)["models"] == {"pets": [1, 2]} and readyz(live)["loadable"] == {"zoo": [1]}
        assert predict(live, "zoo").status_code == 200  # evicts pets 1, the least recently used
        assert readyz(live)["models"] == {"pets": [2], "zoo": [1]}
        response = httpx.post(
            f"{live.url}/predict",
            params={"model": "pets", "version": 1},
            content=npy_batch(),
            headers={"content-type": "application/x-npy"},
            timeout=60,
        )
        assert response.status_code == 200 and response.json()["model"] == {"name": "pets", "version": 1}
        assert "server-timing" in response.headers
        assert accounted_mib(live) <= BUDGET_MB
