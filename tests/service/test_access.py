"""Who may change the server and call it: tokens, names that stay names, honest readiness, browser
requests from other sites, TLS — all through a real uvicorn and real clients.

Each test arranges what an attacker would try (no token, a wrong one, `..`, an excluded model, a
cross-site form POST, a plain-HTTP or certificate-less client) and asserts both the answer and that
nothing changed on the server.
"""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.http as triton
import trustme
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from service.app import ROUTERS
from service.errors import StartupError
from service.settings import Settings
from service.transport.access import Credentials, Role, role_of
from service.transport.server import check_tls
from tests.liveserver import LiveServer, live_server
from tests.photos import jpeg
from tests.service.promtext import metric
from tests.tinymodel import tiny_settings

ADMIN = "admin-0123456789abcdef"
INFERENCE = "inference-0123456789abcdef"
METRICS = "metrics-0123456789abcdef"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload() -> dict[str, Any]:
    return {"image": ("cat.jpg", jpeg("chelsea"), "image/jpeg")}


@pytest.fixture
def repository(tmp_path: Path, tiny_model_path: Path) -> Path:
    """tiny and other (servable), broken (a file ONNX Runtime refuses), .hidden (a hidden directory),
    and, beside the repository, outside (a model reachable only through `..`)."""
    root = tmp_path / "repository"
    for name in ("tiny", "other", ".hidden"):
        (root / name / "1").mkdir(parents=True)
        shutil.copy(tiny_model_path, root / name / "1" / "model.onnx")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    (tmp_path / "outside" / "1").mkdir(parents=True)
    shutil.copy(tiny_model_path, tmp_path / "outside" / "1" / "model.onnx")
    return root


def settings_for(repository: Path, **fields: Any) -> Settings:
    """The tiny test settings serving `tiny` alone unless `fields` say otherwise."""
    return tiny_settings(repository, **{"models": ["tiny"], **fields})


def served(live: LiveServer) -> dict[str, list[int]]:
    response = httpx.get(f"{live.url}/readyz")
    return response.json().get("models", {}) if response.status_code == 200 else {}


@pytest.fixture
def explicit(repository: Path) -> Iterator[LiveServer]:
    """Explicit model control with an admin token, serving `tiny`."""
    with live_server(settings_for(repository, model_control="explicit", admin_token=ADMIN)) as live:
        yield live


# ---- tokens -------------------------------------------------------------------------------------


def test_repository_api_without_the_admin_token_is_401_and_changes_nothing(explicit: LiveServer) -> None:
    with httpx.Client(base_url=explicit.url) as client:
        for path in ("/v2/repository/models/tiny/unload", "/v2/repository/models/other/load"):
            missing = client.post(path)
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"].startswith("Bearer")
            assert "admin token" in missing.json()["error"]
            for wrong in (bearer("x" * 20), bearer(INFERENCE), {"Authorization": f"Basic {ADMIN}"}):
                assert client.post(path, headers=wrong).status_code in (401, 403)
        assert client.post("/v2/repository/index").status_code == 401
        assert served(explicit) == {"tiny": [1]}
        assert client.post("/predict", files=upload()).status_code == 200
        metrics = client.get("/metrics").text
        assert metric(metrics, 'convserve_rejected_total{reason="unauthorized"}') == 9


def test_the_admin_token_loads_and_unloads_through_tritonclient(
    repository: Path, triton_client: Callable[[LiveServer], triton.InferenceServerClient]
) -> None:
    shutil.rmtree(repository / "broken")
    settings = settings_for(repository, model_control="explicit", admin_token=ADMIN, models=[])
    with live_server(settings) as live:
        client = triton_client(live)
        assert served(live) == {"other": [1], "tiny": [1]}
        with pytest.raises(InferenceServerException, match="admin token"):
            client.unload_model("other")
        assert client.is_model_ready("other")
        client.unload_model("other", headers=bearer(ADMIN))
        assert not client.is_model_ready("other")
        client.load_model("other", headers=bearer(ADMIN))
        assert served(live) == {"other": [1], "tiny": [1]}


def test_inference_token_guards_inference_and_metadata_but_not_probes(repository: Path) -> None:
    settings = settings_for(repository, inference_token=INFERENCE, admin_token=ADMIN)
    with live_server(settings) as live, httpx.Client(base_url=live.url) as client:
        assert client.post("/predict", files=upload()).status_code == 401
        assert client.post("/predict", files=upload(), headers=bearer("y" * 20)).status_code == 403
        assert client.post("/predict", files=upload(), headers=bearer(INFERENCE)).status_code == 200
        assert client.post("/predict", files=upload(), headers=bearer(ADMIN)).status_code == 200
        for path in ("/v2/models/tiny", "/v2/models/tiny/config", "/v2", "/no/such/route"):
            assert client.get(path).status_code == 401, path
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2/models/tiny/ready"):
            assert client.get(path).status_code == 200, path
        assert client.get("/metrics").status_code == 200  # open unless METRICS_TOKEN is set
        # The inference token is not an admin token.
        assert client.post("/v2/repository/index", headers=bearer(INFERENCE)).status_code == 403


def test_metrics_token_and_the_triton_style_token_header(
    repository: Path, triton_client: Callable[[LiveServer], triton.InferenceServerClient]
) -> None:
    settings = settings_for(
        repository, metrics_token=METRICS, inference_token=INFERENCE, token_header="infer-key"
    )
    with live_server(settings) as live, httpx.Client(base_url=live.url) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer(INFERENCE)).status_code == 403
        assert client.get("/metrics", headers=bearer(METRICS)).status_code == 200
        inference_client = triton_client(live)
        assert inference_client.get_model_metadata("tiny", headers={"infer-key": INFERENCE})["name"] == "tiny"
        with pytest.raises(InferenceServerException):
            inference_client.get_model_metadata("tiny", headers={"infer-key": METRICS})


def test_tokens_never_reach_the_log(repository: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(repository, inference_token=INFERENCE)
    caplog.set_level(logging.DEBUG)
    with live_server(settings) as live, httpx.Client(base_url=live.url) as client:
        wrong = "wrong-token-that-must-not-be-logged"
        assert client.post("/predict", files=upload(), headers=bearer(wrong)).status_code == 403
        assert client.post("/predict", files=upload(), headers=bearer(INFERENCE)).status_code == 200
    assert caplog.records, "the service logs each request"
    assert not [r for r in caplog.records if wrong in r.getMessage() or INFERENCE in r.getMessage()]


def test_token_settings_are_checked_before_serving(tmp_path: Path, repository: Path) -> None:
    with pytest.raises(ValidationError, match="UNSAFE_UNAUTHENTICATED_ADMIN"):
        settings_for(repository, model_control="explicit")
    assert settings_for(repository, model_control="explicit", unsafe_unauthenticated_admin=True)
    with pytest.raises(ValidationError, match="at least 16"):
        settings_for(repository, admin_token="short")
    token_file = tmp_path / "admin-token"
    token_file.write_text(f"  {ADMIN}\n")
    with pytest.raises(ValidationError, match="both set"):
        settings_for(repository, admin_token=ADMIN, admin_token_file=token_file)
    credentials = Credentials.from_settings(settings_for(repository, admin_token_file=token_file))
    assert credentials.accepted(Role.ADMIN) == Credentials.from_settings(
        settings_for(repository, admin_token=ADMIN)
    ).accepted(Role.ADMIN)
    token_file.write_text("weak\n")
    with pytest.raises(StartupError, match="at least 16"):
        Credentials.from_settings(settings_for(repository, admin_token_file=token_file))
    with pytest.raises(StartupError, match="cannot read"):
        Credentials.from_settings(settings_for(repository, admin_token_file=tmp_path / "missing"))
    assert "admin-0123" not in repr(settings_for(repository, admin_token=ADMIN))


def test_every_route_of_the_app_has_a_deliberate_role(explicit: LiveServer) -> None:
    open_routes = {path for path in _paths(explicit) if role_of(path) is Role.OPEN}
    assert open_routes == {
        "/healthz",
        "/readyz",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model_name}/ready",
        "/v2/models/{model_name}/versions/{model_version}/ready",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/",
        "/ui",
        "/ui/static/{name}",
    }
    assert {path for path in _paths(explicit) if path.startswith("/v2/repository")} == {
        path for path in _paths(explicit) if role_of(path) is Role.ADMIN
    }


def _paths(live: LiveServer) -> set[str]:
    """Every route: the documented ones, the service's routers' (the upload page is not documented)
    and FastAPI's own docs routes."""
    documented = set(live.app.openapi()["paths"])
    routed = {str(getattr(route, "path", "")) for router in ROUTERS for route in router.routes}
    return documented | routed | {str(getattr(route, "path", "")) for route in live.app.routes} - {""}


# ---- names are names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("..", 404),
        ("%2e%2e", 404),
        ("..%2Foutside", 404),  # decoded before routing: no route matches
        ("tiny%2F..%2F..%2Foutside", 404),
        (".hidden", 404),
        ("a" * 300, 404),
        ("other", 404),  # in the repository, but CONVSERVE_MODELS excludes it
        ("outside", 404),
        ("no-such-model", 404),
    ],
)
def test_load_refuses_names_outside_the_served_repository(
    explicit: LiveServer, name: str, status: int
) -> None:
    # http.client sends the path as written (httpx would resolve `..` itself before sending).
    connection = http.client.HTTPConnection(explicit.host, explicit.port, timeout=30)
    connection.request("POST", f"/v2/repository/models/{name}/load", headers=bearer(ADMIN))
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert response.status == status, text
    assert len(text) < 400 and "error" in json.loads(text)  # a long name is never echoed whole
    with httpx.Client(base_url=explicit.url) as client:
        assert served(explicit) == {"tiny": [1]}
        assert client.post("/predict", files=upload()).json()["model"]["name"] == "tiny"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/tiny/versions/" + "9" * 5000,
        "/v2/models/tiny/versions/" + "9" * 5000 + "/ready",
        "/v2/models/" + "a" * 300,
        "/v2/models/" + "a" * 300 + "/ready",
        "/v2/models/tiny/versions/-1",
        "/v2/models/tiny/versions/0x10",
    ],
)
def test_no_name_or_version_string_gets_a_500(explicit: LiveServer, path: str) -> None:
    response = httpx.get(explicit.url + path)
    assert 400 <= response.status_code < 500
    assert len(response.text) < 400 and "error" in response.json()


def test_predict_query_names_and_versions_are_bounded_and_not_echoed(repository: Path) -> None:
    with live_server(settings_for(repository)) as live, httpx.Client(base_url=live.url) as client:
        for params in ({"model": "m" * 10_000}, {"version": "9" * 5000}, {"model": "../outside"}):
            response = client.post("/predict", params=params, files=upload())
            assert 400 <= response.status_code < 500
            assert len(response.content) < 400, response.text


# ---- readiness tells the truth ----------------------------------------------------------------------


def test_failed_loads_and_unloads_move_readiness_only_for_required_models(repository: Path) -> None:
    settings = settings_for(repository, model_control="explicit", admin_token=ADMIN)
    with live_server(settings) as live, httpx.Client(base_url=live.url, headers=bearer(ADMIN)) as client:
        # Outside CONVSERVE_MODELS: not even attempted, and the server stays ready.
        assert client.post("/v2/repository/models/broken/load").status_code == 404
        assert client.get("/readyz").status_code == 200
        # The required model unloaded on request: /readyz says so until it is loaded again.
        assert client.post("/v2/repository/models/tiny/unload").status_code == 200
        readiness = client.get("/readyz")
        assert readiness.status_code == 503 and "unloaded on request" in readiness.json()["error"]
        assert httpx.get(f"{live.url}/healthz").status_code == 200
        assert client.post("/v2/repository/models/tiny/load").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_a_failed_explicit_load_of_a_model_outside_the_start_up_set_keeps_readiness(
    repository: Path,
) -> None:
    shutil.rmtree(repository / ".hidden")
    settings = settings_for(
        repository, model_control="explicit", admin_token=ADMIN, models=[], model_name="tiny"
    )
    (repository / "broken").rename(repository.parent / "broken-aside")
    with live_server(settings) as live, httpx.Client(base_url=live.url, headers=bearer(ADMIN)) as client:
        (repository.parent / "broken-aside").rename(repository / "broken")  # appears after start-up
        failed = client.post("/v2/repository/models/broken/load")
        assert failed.status_code == 400 and "failed to load 'broken'" in failed.json()["error"]
        assert client.get("/readyz").status_code == 200
        # Requests without ?model= still go to the default; loading another model changes nothing there.
        assert client.post("/v2/repository/models/other/load").status_code == 200
        assert client.post("/predict", files=upload()).json()["model"]["name"] == "tiny"


def test_unknown_model_messages_say_nothing_is_served_when_nothing_is(repository: Path) -> None:
    settings = settings_for(repository, model_control="explicit", admin_token=ADMIN)
    with live_server(settings) as live, httpx.Client(base_url=live.url, headers=bearer(ADMIN)) as client:
        assert client.post("/v2/repository/models/tiny/unload").status_code == 200
        answer = client.post("/predict", params={"model": "other"}, files=upload())
        assert answer.status_code == 404
        assert "no model is served at the moment" in answer.json()["error"]


# ---- browser-shaped requests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://sub.localhost"},
    ],
)
def test_cross_site_browser_posts_are_refused_before_anything_runs(
    repository: Path, headers: dict[str, str]
) -> None:
    # The worst case: an operator who accepted an unauthenticated admin API on a private port.
    settings = settings_for(repository, model_control="explicit", unsafe_unauthenticated_admin=True)
    with live_server(settings) as live, httpx.Client(base_url=live.url) as client:
        form = client.post(
            "/v2/repository/models/tiny/unload",
            headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
            content=b"a=b",
        )
        assert form.status_code == 403 and "cross-site" in form.json()["error"]
        assert client.post("/predict", files=upload(), headers=headers).status_code == 403
        assert served(live) == {"tiny": [1]}
        # Not a browser (no Origin, no Sec-Fetch-Site), or the same origin: allowed.
        assert client.post("/predict", files=upload()).status_code == 200
        same = {"Origin": live.url, "Sec-Fetch-Site": "same-origin"}
        assert client.post("/predict", files=upload(), headers=same).status_code == 200
        assert client.post("/predict", files=upload(), headers={"Origin": live.url}).status_code == 200
        metrics = client.get("/metrics").text
        assert metric(metrics, 'convserve_rejected_total{reason="cross_origin"}') == 2


def test_cors_is_off_unless_origins_are_listed(repository: Path) -> None:
    app_origin = "https://app.example.com"
    preflight = {
        "Origin": app_origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    with live_server(settings_for(repository)) as live:
        answer = httpx.options(f"{live.url}/predict", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
    settings = settings_for(repository, cors_origins=app_origin, inference_token=INFERENCE)
    with live_server(settings) as live, httpx.Client(base_url=live.url) as client:
        answer = client.options("/predict", headers=preflight)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == app_origin
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        allowed = {"Origin": app_origin, "Sec-Fetch-Site": "cross-site", **bearer(INFERENCE)}
        response = client.post("/predict", files=upload(), headers=allowed)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == app_origin
        other = {"Origin": "https://other.example", "Sec-Fetch-Site": "cross-site", **bearer(INFERENCE)}
        assert client.post("/predict", files=upload(), headers=other).status_code == 403


# ---- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a foreign CA's client cert."""
    directory = tmp_path_factory.mktemp("pki")
    ca, foreign = trustme.CA(), trustme.CA()
    files = {
        "ca": directory / "ca.pem",
        "server": directory / "server.pem",
        "server_key": directory / "server.key",
        "client": directory / "client.pem",
        "foreign_client": directory / "foreign.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_pem.write_to_path(str(files["server_key"]))
    server.cert_chain_pems[0].write_to_path(str(files["server"]))
    ca.issue_cert("client@example").private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    foreign.issue_cert("client@example").private_key_and_cert_chain_pem.write_to_path(
        str(files["foreign_client"])
    )
    return files


def _context(pki: dict[str, Path], client_cert: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if client_cert is not None:
        context.load_cert_chain(str(client_cert))
    return context


def test_tls_serves_https_only(repository: Path, pki: dict[str, Path]) -> None:
    settings = settings_for(repository, tls_certfile=pki["server"], tls_keyfile=pki["server_key"])
    with live_server(settings, client_options={"verify": _context(pki)}) as live:
        assert live.url.startswith("https://")
        with httpx.Client(base_url=live.url, verify=_context(pki)) as client:
            assert client.post("/predict", files=upload()).status_code == 200
        # Plain HTTP on the TLS port gets no HTTP answer: the handshake fails and the connection closes.
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError)):
            httpx.get(f"http://127.0.0.1:{live.port}/healthz", timeout=5)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
            httpx.get(f"{live.url}/healthz", timeout=5)


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(
    repository: Path, pki: dict[str, Path]
) -> None:
    settings = settings_for(
        repository, tls_certfile=pki["server"], tls_keyfile=pki["server_key"], tls_client_ca=pki["ca"]
    )
    trusted = _context(pki, pki["client"])
    with live_server(settings, client_options={"verify": trusted}) as live:
        with httpx.Client(base_url=live.url, verify=trusted) as client:
            assert client.post("/predict", files=upload()).status_code == 200
        for context in (_context(pki), _context(pki, pki["foreign_client"])):
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                httpx.get(f"{live.url}/healthz", verify=context, timeout=5)
        # The container's health probe reads the same settings and presents the server's certificate.
        tls_env = {
            "CONVSERVE_TLS_CERTFILE": str(pki["server"]),
            "CONVSERVE_TLS_KEYFILE": str(pki["server_key"]),
            "CONVSERVE_TLS_CLIENT_CA": str(pki["ca"]),
        }
        assert probe(live.port, tls_env).returncode == 0
        assert probe(live.port, {**tls_env, "CONVSERVE_TLS_CLIENT_CA": ""}).returncode == 1


def probe(port: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """deploy/healthcheck.py (the image's HEALTHCHECK) against `port`."""
    script = Path(__file__).parents[2] / "deploy" / "healthcheck.py"
    return subprocess.run(
        [sys.executable, str(script)],
        env={"CONVSERVE_PORT": str(port), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_tls_files_that_cannot_be_used_stop_the_start(
    tmp_path: Path, repository: Path, pki: dict[str, Path]
) -> None:
    with pytest.raises(ValidationError, match="together"):
        settings_for(repository, tls_certfile=pki["server"])
    mismatched = settings_for(repository, tls_certfile=pki["server"], tls_keyfile=pki["client"])
    with pytest.raises(StartupError, match="TLS"):
        check_tls(mismatched)
    with pytest.raises(StartupError, match="TLS"):
        check_tls(settings_for(repository, tls_certfile=tmp_path / "none.pem", tls_keyfile=pki["server_key"]))
