"""Settings: defaults, environment parsing, and refusal of inconsistent values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings

ISSUE_VARIABLES = [
    "MODEL_REPOSITORY",
    "MODEL_NAME",
    "MODEL_VERSION",
    "HOST",
    "PORT",
    "MAX_BATCH_SIZE",
    "MAX_QUEUE_DELAY_MS",
    "MAX_QUEUE_SIZE",
    "REQUEST_TIMEOUT_S",
    "PROVIDERS",
    "REQUIRE_GPU",
    "MAX_UPLOAD_BYTES",
    "INTRA_OP_THREADS",
    "WORKERS",
    # what a slow, hostile or mistaken client can cost
    "MAX_IMAGE_PIXELS",
    "MAX_DECODED_PIXELS",
    "HEADER_TIMEOUT_S",
    "BODY_TIMEOUT_S",
    "MIN_BODY_RATE",
    "MAX_CONNECTIONS",
    # several models, version policies, model control
    "MODELS",
    "VERSION_POLICY",
    "MODEL_CONTROL",
    "REPOSITORY_POLL_S",
    # FastAPI's native OpenTelemetry (off: its per-request check cost CPU); model instances
    "OPENTELEMETRY",
    "INSTANCES",
    "CPUS",
    # galleries of labelled examples per model
    "GALLERY_DIR",
    "GALLERY_MAX_ENTRIES",
    "GALLERY_MAX_BYTES",
    "GALLERY_K",
    "GALLERY_WRITES",
    # who may call what, and what one request head may cost
    "CLIENT_ERROR_DELAY_S",
    "MAX_HEADER_BYTES",
    "MAX_BODY_BYTES_IN_FLIGHT",
    "MAX_HEADER_COUNT",
    "ADMIN_TOKEN",
    "ADMIN_TOKEN_FILE",
    "INFERENCE_TOKEN",
    "INFERENCE_TOKEN_FILE",
    "METRICS_TOKEN",
    "METRICS_TOKEN_FILE",
    "TOKEN_HEADER",
    "UNSAFE_UNAUTHENTICATED_ADMIN",
    "CORS_ORIGINS",
    "TLS_CERTFILE",
    "TLS_KEYFILE",
    "TLS_CLIENT_CA",
    # the ecosystem: V2 gRPC, logs for log shippers
    "GRPC_PORT",
    "GRPC_MAX_MESSAGE_BYTES",
    "LOG_LEVEL",
    "LOG_FORMAT",
    # many models per box; the CUDA device
    "MEMORY_BUDGET_MB",
    "GPU_DEVICE_ID",
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ISSUE_VARIABLES:
        monkeypatch.delenv(f"CONVSERVE_{name}", raising=False)


def test_defaults_match_the_issue() -> None:
    settings = Settings()
    assert settings.model_repository == Path("models")
    assert settings.model_name is None and settings.model_version is None
    assert (settings.host, settings.port, settings.max_batch_size) == ("0.0.0.0", 8000, 32)
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.require_gpu is False
    assert settings.workers == 1
    assert (settings.grpc_port, settings.log_level, settings.log_format) == (8001, "INFO", "text")


def test_every_issue_variable_is_a_documented_field_with_a_unit_or_meaning() -> None:
    fields = Settings.model_fields
    assert sorted(fields) == sorted(name.lower() for name in ISSUE_VARIABLES)
    for name, field in fields.items():
        assert field.description and len(field.description) > 20, f"{name} has no docstring"


def test_environment_variables_are_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("CONVSERVE_MAX_QUEUE_DELAY_MS", "2.5")
    monkeypatch.setenv("CONVSERVE_PROVIDERS", "cpu")
    monkeypatch.setenv("CONVSERVE_MODEL_VERSION", "3")
    monkeypatch.setenv("CONVSERVE_REQUIRE_GPU", "false")
    settings = Settings()
    assert settings.max_batch_size == 8
    assert settings.max_queue_delay_s == pytest.approx(0.0025)
    assert settings.providers == ["CPUExecutionProvider"]
    assert settings.model_version == 3


def test_log_settings_ignore_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_LOG_LEVEL", "debug")
    monkeypatch.setenv("CONVSERVE_LOG_FORMAT", "JSON")
    settings = Settings()
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")


def test_providers_accept_aliases_and_ort_names_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_PROVIDERS", "CUDA, CPUExecutionProvider")
    assert Settings().providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_batch_size": 64, "max_queue_size": 32}, "MAX_QUEUE_SIZE"),
        ({"max_queue_delay_ms": 2000, "request_timeout_s": 1}, "MAX_QUEUE_DELAY_MS"),
        ({"require_gpu": True, "providers": "cpu"}, "REQUIRE_GPU"),
        ({"providers": "cuda,cuda"}, "twice"),
        ({"providers": "CUDAExecutionProvder"}, "unknown execution provider"),
        ({"providers": ""}, "empty"),
        ({"port": 0}, "port"),
        ({"grpc_port": 8000}, "GRPC_PORT"),
        ({"grpc_max_message_bytes": 512}, "grpc_max_message_bytes"),
        ({"grpc_port": 70000}, "grpc_port"),
        ({"log_format": "xml"}, "log_format"),
        ({"log_level": "loud"}, "log_level"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"model_version": 0}, "model_version"),
        ({"model_name": "../elsewhere"}, "MODEL_NAME"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_inconsistent_or_invalid_values_refuse_with_a_message(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)  # type: ignore[arg-type]
