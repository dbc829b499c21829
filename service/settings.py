"""Service configuration: one pydantic-settings class read from `CONVSERVE_*` environment variables.

Built once by `python -m service` and passed into `create_app(settings)`; nothing else reads the
environment. Inconsistent combinations are refused at construction with a message naming the
variables involved, so a bad deployment fails at start-up rather than under load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.repository import VersionPolicy

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
GPU_PROVIDERS = frozenset({CUDA_PROVIDER, "TensorrtExecutionProvider"})
PROVIDER_ALIASES = {
    "cuda": CUDA_PROVIDER,
    "cpu": CPU_PROVIDER,
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


def _known_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_all_providers())


def normalize_provider(name: str) -> str:
    """Map a short alias (`cuda`, `cpu`, ...) or an ONNX Runtime provider name to the ORT name."""
    cleaned = name.strip()
    canonical = PROVIDER_ALIASES.get(cleaned.lower(), cleaned)
    known = _known_providers()
    if canonical not in known:
        raise ValueError(
            f"unknown execution provider {cleaned!r} in CONVSERVE_PROVIDERS; use a comma-separated list "
            f"of {sorted(PROVIDER_ALIASES)} or ONNX Runtime names such as {known[:4]}"
        )
    return canonical


def _check_directory_name(name: str, variable: str) -> None:
    if not name.strip() or "/" in name or name.startswith("."):
        raise ValueError(f"{variable}: {name!r} must be a directory name inside the repository")


class Settings(BaseSettings):
    """Every knob of the service; each maps to the environment variable `CONVSERVE_<NAME>`."""

    model_config = SettingsConfigDict(
        env_prefix="CONVSERVE_", extra="ignore", protected_namespaces=(), use_attribute_docstrings=True
    )

    model_repository: Path = Path("models")
    """Directory holding `<name>/<version>/model.onnx` (a path; relative to the working directory)."""
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Models (repository sub-directories) to serve, comma-separated; empty = every model there."""
    model_name: str | None = None
    """Default model for `/predict` without `?model=`; unset = the only model served (400 if several)."""
    model_version: int | None = Field(default=None, ge=1)
    """Shortcut for VERSION_POLICY=specific:<version> (a positive integer); unset = use VERSION_POLICY."""
    version_policy: str = "latest"
    """Versions served per model: `latest` (newest only), `latest:N`, `all`, or `specific:1,3`."""
    model_control: Literal["poll", "explicit", "none"] = "poll"
    """`poll`: rescan the repository; `explicit`: V2 load/unload API; `none`: load at start only."""
    repository_poll_s: float = Field(default=5.0, gt=0.0)
    """Seconds between repository scans when MODEL_CONTROL=poll."""
    host: str = "0.0.0.0"
    """Interface address to listen on (0.0.0.0 = all interfaces)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port to listen on."""
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    """Largest number of images (rows) in one `session.run` call, in images."""
    # 0 by default: the collector forms the next batch from whatever queued while the previous
    # `session.run` was busy, so under load batches fill by themselves, and a lone request is not held
    # back (measured on 2 CPU cores: p99 at concurrency 1 33.5 ms with 0 vs 39.9 ms with 5 ms, the same
    # throughput and mean batch size at concurrency 32). Raise it on a GPU, where bigger batches pay.
    max_queue_delay_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    """Longest time the batcher holds the first queued image waiting for more, in milliseconds (0 = none)."""
    max_queue_size: int = Field(default=256, ge=1)
    """Most images waiting in the batching queue; beyond it requests get 503 + Retry-After, in images."""
    request_timeout_s: float = Field(default=30.0, gt=0.0)
    """Deadline from arrival; a request still queued after it gets 504 and is never computed, in seconds."""
    providers: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    """ONNX Runtime execution providers in order of preference, comma-separated (`cuda,cpu`)."""
    require_gpu: bool = False
    """Refuse to start unless a GPU provider (CUDA or TensorRT) is the one actually active (true/false)."""
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest accepted request body, in bytes; larger bodies get 413."""
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    """Largest image area an upload may declare in its header, in pixels; larger ones get 422."""
    max_decoded_pixels: int = Field(default=4_194_304, ge=1)
    """Largest area actually decoded (after JPEG DCT-scaling; PNG and others at full size), in pixels."""
    header_timeout_s: float = Field(default=10.0, gt=0.0)
    """Time a connection gets to send a complete request head (line and headers), in seconds."""
    body_timeout_s: float = Field(default=10.0, gt=0.0)
    """Longest pause allowed while a request body arrives, in seconds; beyond it 408."""
    min_body_rate: float = Field(default=16_384.0, gt=0.0)
    """Average rate a body must keep once it is older than BODY_TIMEOUT_S, in bytes per second."""
    max_connections: int = Field(default=512, ge=1)
    """Open client connections per worker, a count; requests on connections beyond it get 503."""
    intra_op_threads: int = Field(default=0, ge=0)
    """Threads ONNX Runtime uses inside one operator, a count (0 = ONNX Runtime's default, one per core)."""
    instances: int = Field(default=1, ge=1)
    """Batches of one model version computed at once, a count (Triton's instance count); on a CPU,
    N instances with INTRA_OP_THREADS=cores/N avoid the per-operator thread barrier."""
    workers: int = Field(default=1, ge=1)
    """Uvicorn worker processes, a count; each loads its own model copy and keeps its own metrics."""
    opentelemetry: bool = False
    """FastAPI's native OpenTelemetry spans, metrics and logs, sent to the providers an OpenTelemetry SDK
    configures (e.g. `opentelemetry-instrument`). Off by default: looking for a provider costs ~0.2 ms
    of CPU on every request, and the service's own metrics are Prometheus."""

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        return value

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, value: list[str]) -> list[str]:
        names = [normalize_provider(name) for name in value]
        if not names:
            raise ValueError("CONVSERVE_PROVIDERS is empty; list at least one provider, e.g. `cuda,cpu`")
        if len(set(names)) != len(names):
            raise ValueError(f"CONVSERVE_PROVIDERS lists a provider twice: {names}")
        return names

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_directory_name(name, "CONVSERVE_MODELS")
        return value

    @field_validator("version_policy")
    @classmethod
    def _check_policy(cls, value: str) -> str:
        try:
            VersionPolicy.parse(value)
        except ValueError as exc:
            raise ValueError(f"CONVSERVE_VERSION_POLICY: {exc}") from None
        return value

    @property
    def policy(self) -> VersionPolicy:
        """The version policy (MODEL_VERSION, when set, pins that one version)."""
        if self.model_version is not None:
            return VersionPolicy(latest=None, specific=(self.model_version,))
        return VersionPolicy.parse(self.version_policy)

    @field_validator("model_name")
    @classmethod
    def _check_model_name(cls, value: str | None) -> str | None:
        if value is not None:
            _check_directory_name(value, "CONVSERVE_MODEL_NAME")
        return value or None

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.max_queue_size < self.max_batch_size:
            raise ValueError(
                f"CONVSERVE_MAX_QUEUE_SIZE ({self.max_queue_size}) is smaller than CONVSERVE_MAX_BATCH_SIZE "
                f"({self.max_batch_size}), so a full batch could never be queued; raise the queue size"
            )
        if self.max_queue_delay_ms >= self.request_timeout_s * 1000:
            raise ValueError(
                f"CONVSERVE_MAX_QUEUE_DELAY_MS ({self.max_queue_delay_ms:g} ms) is not below "
                f"CONVSERVE_REQUEST_TIMEOUT_S ({self.request_timeout_s:g} s), so a lone request could time "
                "out while the batcher waits for company; lower the delay or raise the timeout"
            )
        if self.model_version is not None and self.version_policy != "latest":
            raise ValueError(
                "CONVSERVE_MODEL_VERSION and CONVSERVE_VERSION_POLICY are both set; use "
                f"CONVSERVE_VERSION_POLICY=specific:{self.model_version} alone"
            )
        if self.max_decoded_pixels > self.max_image_pixels:
            raise ValueError(
                f"CONVSERVE_MAX_DECODED_PIXELS ({self.max_decoded_pixels}) is above "
                f"CONVSERVE_MAX_IMAGE_PIXELS ({self.max_image_pixels}); no image could use the difference"
            )
        if self.require_gpu and not GPU_PROVIDERS & set(self.providers):
            raise ValueError(
                f"CONVSERVE_REQUIRE_GPU=true but CONVSERVE_PROVIDERS={','.join(self.providers)} has no GPU "
                "provider; add `cuda` to the providers or set CONVSERVE_REQUIRE_GPU=false"
            )
        return self

    @property
    def max_queue_delay_s(self) -> float:
        """`max_queue_delay_ms` in seconds."""
        return self.max_queue_delay_ms / 1000.0
