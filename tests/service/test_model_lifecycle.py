"""Several models and versions, loaded, swapped and unloaded while serving — over real HTTP.

Repositories are built per test from the tiny exported model; new versions appear the way
`python -m training fit` publishes them (a complete directory renamed into place). Clients keep
posting real JPEGs throughout; every answer must be a 200 naming a version that existed.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.settings import Settings
from tests.liveserver import LiveServer, live_server
from tests.photos import jpeg
from tests.service.promtext import metric
from tests.tinymodel import tiny_settings
from tests.waiting import wait_until

WAIT_S = 60.0


def publish(root: Path, name: str, version: int, source: Path, truncate: bool = False) -> None:
    """Put `source` in as `name/version` atomically, as the training exporter does."""
    staging = root / name / f".staging-{version}"
    staging.mkdir(parents=True)
    data = source.read_bytes()
    (staging / "model.onnx").write_bytes(data[: len(data) // 3] if truncate else data)
    os.rename(staging, root / name / str(version))


@pytest.fixture
def repository(tmp_path: Path, tiny_model_path: Path) -> Path:
    """alpha (versions 1 and 2) and beta (version 1)."""
    for name, version in (("alpha", 1), ("alpha", 2), ("beta", 1)):
        publish(tmp_path, name, version, tiny_model_path)
    return tmp_path


def settings_for(repository: Path, **fields: object) -> Settings:
    """The tiny test settings with room for the steady-load clients' images."""
    return tiny_settings(repository, **{"max_queue_size": 64, **fields})


def count_scans(live: LiveServer) -> Callable[[], int]:
    """A counter of the repository scans the server completes from now on (its registry's `sync`
    calls), so a test can wait for polls to have happened instead of sleeping a few intervals."""
    registry = live.app.state.convserve.registry
    original, completed = registry.sync, [0]

    async def counted(names: list[str]) -> None:
        await original(names)
        completed[0] += 1

    registry.sync = counted
    return lambda: completed[0]


def served(live: LiveServer) -> dict[str, list[int]]:
    response = httpx.get(f"{live.url}/readyz")
    return response.json().get("models", {}) if response.status_code == 200 else {}


def index(live: LiveServer) -> dict[tuple[str, int], tuple[str, str]]:
    entries = httpx.post(f"{live.url}/v2/repository/index").json()
    return {(e["name"], int(e["version"])): (e["state"], e["reason"]) for e in entries}


def predict(client: httpx.Client, model: str | None = None, version: int | None = None) -> httpx.Response:
    params = {k: v for k, v in {"model": model, "version": version}.items() if v is not None}
    files = {"image": ("cat.jpg", jpeg("chelsea"), "image/jpeg")}
    return client.post("/predict", params=params, files=files, timeout=WAIT_S)


@dataclass
class Load:
    """Clients posting JPEGs until stopped; every status and the version that answered."""

    answers: list[tuple[int, int | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


@contextmanager
def steady_load(live: LiveServer, clients: int, model: str) -> Iterator[Load]:
    load = Load()

    def client_loop() -> None:
        with httpx.Client(base_url=live.url) as client:
            while not load.stop.is_set():
                response = predict(client, model)
                version = response.json()["model"]["version"] if response.status_code == 200 else None
                load.answers.append((response.status_code, version))

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(WAIT_S)


def test_every_model_and_version_is_served_and_reachable(
    repository: Path, triton_client: Callable[[LiveServer], triton.InferenceServerClient]
) -> None:
    with (
        live_server(settings_for(repository, version_policy="all")) as live,
        httpx.Client(base_url=live.url) as c,
    ):
        assert served(live) == {"alpha": [1, 2], "beta": [1]}
        for model, version in (("alpha", 1), ("alpha", 2), ("beta", 1)):
            response = predict(c, model, version)
            assert response.json()["model"] == {"name": model, "version": version}
        assert predict(c, "alpha").json()["model"]["version"] == 2  # newest ready version by default
        ambiguous = predict(c)
        assert ambiguous.status_code == 400 and "['alpha', 'beta']" in ambiguous.json()["error"]
        assert predict(c, "gamma").status_code == 404 and predict(c, "alpha", 7).status_code == 404

        client = triton_client(live)
        states = {(e["name"], e["version"]): e["state"] for e in client.get_model_repository_index()}
        assert states == {("alpha", "1"): "READY", ("alpha", "2"): "READY", ("beta", "1"): "READY"}
        tensor = np.zeros((1, 3, 32, 32), np.float32)
        for model, version in (("alpha", "1"), ("alpha", "2"), ("beta", "1")):
            infer_input = triton.InferInput("input", [1, 3, 32, 32], "FP32")
            infer_input.set_data_from_numpy(tensor)
            result = client.infer(model, [infer_input], model_version=version)
            assert result.get_response()["model_version"] == version
            assert client.is_model_ready(model, version)
        metrics = httpx.get(f"{live.url}/metrics").text
        assert metric(metrics, 'convserve_model_info{model="alpha",version="2",state="READY"}') == 1
        assert metric(metrics, 'convserve_requests_total{model="beta",version="1"}') >= 2


def test_poll_mode_swaps_new_versions_in_under_load_without_a_failed_request(
    repository: Path, tiny_model_path: Path
) -> None:
    settings = settings_for(repository, repository_poll_s=0.2)
    with live_server(settings) as live:
        assert served(live)["alpha"] == [2]
        with steady_load(live, clients=8, model="alpha") as load:
            for version in (3, 4, 5):
                publish(repository, "alpha", version, tiny_model_path)
                alone = f"alpha serving version {version} alone"
                wait_until(lambda v=version: served(live).get("alpha") == [v], alone)
            before = len(load.answers)
            wait_until(lambda: 5 in (v for _, v in load.answers[before:]), "a request answered by version 5")
        statuses = {status for status, _ in load.answers}
        versions = {version for _, version in load.answers}
        assert statuses == {200}, f"{len(load.answers)} requests: statuses {statuses}"
        assert versions <= {2, 3, 4, 5} and 5 in versions
        states = index(live)
        assert states[("alpha", 5)] == ("READY", "")
        assert [states[("alpha", v)][0] for v in (2, 3, 4)] == ["UNAVAILABLE"] * 3


def test_a_truncated_new_version_is_unavailable_and_the_old_one_keeps_serving(
    repository: Path, tiny_model_path: Path
) -> None:
    settings = settings_for(repository, repository_poll_s=0.2)
    with live_server(settings) as live:
        with steady_load(live, clients=4, model="alpha") as load:
            publish(repository, "alpha", 3, tiny_model_path, truncate=True)
            scans = count_scans(live)
            wait_until(lambda: index(live).get(("alpha", 3), ("",))[0] == "UNAVAILABLE", "version 3 failing")
            failed_at = scans()
            # More polls: the failed version is not retried and changes nothing.
            wait_until(lambda: scans() >= failed_at + 3, "three more repository scans")
        _, reason = index(live)[("alpha", 3)]
        assert "ONNX Runtime cannot load" in reason
        assert {status for status, _ in load.answers} == {200}
        assert {version for _, version in load.answers} == {2}
        assert served(live)["alpha"] == [2]
        metrics = httpx.get(f"{live.url}/metrics").text
        assert metric(metrics, 'convserve_model_loads_total{model="alpha",result="failure"}') == 1


def test_explicit_mode_loads_and_unloads_only_on_request_through_tritonclient(
    repository: Path,
    tiny_model_path: Path,
    triton_client: Callable[[LiveServer], triton.InferenceServerClient],
) -> None:
    token = "admin-token-for-the-lifecycle-test"
    settings = settings_for(repository, model_control="explicit", repository_poll_s=0.1, admin_token=token)
    admin = {"Authorization": f"Bearer {token}"}
    with live_server(settings) as live:
        client = triton_client(live)
        publish(repository, "alpha", 3, tiny_model_path)
        # The absence of a change is the condition, so time must pass: five poll intervals, in which
        # poll mode would have loaded version 3 (explicit mode runs no poller to count scans of).
        time.sleep(0.5)
        assert served(live) == {"alpha": [2], "beta": [1]}
        listed = client.get_model_repository_index(headers=admin)
        assert ("alpha", "3") in {(e["name"], e["version"]) for e in listed}

        client.load_model("alpha", headers=admin)
        assert served(live)["alpha"] == [3]
        client.unload_model("beta", headers=admin)
        assert "beta" not in served(live) and not client.is_model_ready("beta")
        # beta was required at start-up: unloading it makes the server unready, saying why.
        readiness = httpx.get(f"{live.url}/readyz")
        assert readiness.status_code == 503 and "beta (UNAVAILABLE: unloaded on request)" in readiness.text
        client.load_model("beta", headers=admin)
        assert httpx.get(f"{live.url}/readyz").status_code == 200
        with pytest.raises(InferenceServerException, match="no complete version"):
            client.load_model("gamma", headers=admin)


def test_load_and_unload_are_refused_outside_explicit_mode(
    repository: Path, triton_client: Callable[[LiveServer], triton.InferenceServerClient]
) -> None:
    with live_server(settings_for(repository)) as live:
        client = triton_client(live)
        with pytest.raises(InferenceServerException, match="MODEL_CONTROL=poll"):
            client.load_model("alpha")
        with pytest.raises(InferenceServerException, match="MODEL_CONTROL=poll"):
            client.unload_model("alpha")


def test_a_removed_version_directory_is_unloaded_and_its_model_dropped_when_empty(
    repository: Path,
) -> None:
    settings = settings_for(repository, repository_poll_s=0.2, models="alpha,beta", model_name="alpha")
    with live_server(settings) as live, httpx.Client(base_url=live.url) as client:
        shutil.rmtree(repository / "beta")
        wait_until(lambda: "beta" not in served(live), "beta being unloaded")
        assert client.get("/readyz").status_code == 200
        assert predict(client).json()["model"]["name"] == "alpha"
