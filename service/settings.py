"""Service configuration: one pydantic-settings class read from `CONVSERVE_*` environment variables.

Built once by `python -m service` and passed into `create_app(settings)`; nothing else reads the
environment. Inconsistent combinations are refused at construction with a message naming the
variables involved, so a bad deployment fails at start-up rather than under load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.versionpolicy import VersionPolicy

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
GPU_PROVIDERS = frozenset({CUDA_PROVIDER, "TensorrtExecutionProvider"})
PROVIDER_ALIASES = {
    "cuda": CUDA_PROVIDER,
    "cpu": CPU_PROVIDER,
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


def normalize_provider(name: str) -> str:
    """Map a short alias (`cuda`, `cpu`, ...) or an ONNX Runtime provider name to the ORT name."""
    cleaned = name.strip()
    canonical = PROVIDER_ALIASES.get(cleaned.lower(), cleaned)
    import onnxruntime  # noqa: PLC0415  (only to check a name: `convserve --help` reads these settings)

    known = list(onnxruntime.get_all_providers())
    if canonical not in known:
        raise ValueError(
            f"unknown execution provider {cleaned!r} in CONVSERVE_PROVIDERS; use a comma-separated list "
            f"of {sorted(PROVIDER_ALIASES)} or ONNX Runtime names such as {known[:4]}"
        )
    return canonical


MIN_TOKEN_CHARS = 16
# Headers the service or the HTTP layer already gives a meaning to.
_RESERVED_HEADERS = frozenset(
    {"authorization", "content-type", "content-length", "content-encoding", "host", "cookie", "x-request-id"}
)


def check_token(token: str, where: str) -> None:
    """Refuse tokens a client could guess or a header could not carry."""
    if len(token) < MIN_TOKEN_CHARS or not re.fullmatch(r"[\x21-\x7e]+", token):
        raise ValueError(
            f"{where} must be at least {MIN_TOKEN_CHARS} printable ASCII characters without spaces; "
            "make one with `openssl rand -hex 32`"
        )


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
    memory_budget_mb: int | None = Field(default=None, ge=1)
    """Memory for loaded model versions in one worker, in MiB (each version's cost measured at load);
    unset = load every version the policy selects. Under it, versions that do not fit load on their
    first request, and idle ones are unloaded least recently used first to make room."""
    host: str = "0.0.0.0"
    """Interface address to listen on (0.0.0.0 = all interfaces)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port to listen on."""
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    """TCP port of the KServe V2 gRPC API (`inference.GRPCInferenceService`), on HOST; 0 = no gRPC."""
    grpc_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest gRPC request message (at most MAX_UPLOAD_BYTES applies), in bytes; larger ones get
    RESOURCE_EXHAUSTED. gRPC holds a whole message before the service sees it, so one worker runs at
    most MAX_BODY_BYTES_IN_FLIGHT / this many calls at once (64 by default); send larger batches in
    several calls, or over REST."""
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    """Largest number of images (rows) in one `session.run` call, in images; with several instances a
    batch holds at most what one instance computes in about 60 ms (a CPU core: a few images)."""
    # 0 by default: the next batch forms from whatever queued while the previous
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
    """Refuse to start unless a GPU provider (CUDA or TensorRT) is the one actually active, and stop
    serving (with /healthz failing) if it fails later (true/false)."""
    gpu_device_id: int = Field(default=0, ge=0)
    """The GPU this process serves from, a CUDA device index as the process sees it (inside a container,
    the reserved GPUs are numbered from 0). Several GPUs: one process per GPU, see docs/gpu.md."""
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest accepted request body, in bytes; larger bodies get 413."""
    max_body_bytes_in_flight: int = Field(default=256 * 1024 * 1024, ge=1024)
    """Request body bytes one worker holds at once across all requests, in bytes; a body that would pass
    it gets 503 with Retry-After. At least MAX_UPLOAD_BYTES."""
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
    """Threads ONNX Runtime uses inside one batch's operators, a count (0 = automatic: one with automatic
    INSTANCES, else ONNX Runtime's default of one per core)."""
    cpus: int = Field(default=0, ge=0)
    """Cores the service may use, a count (0 = detect: the CPU affinity, capped by a cgroup CPU limit); set
    it where neither shows the share, such as a Kubernetes CPU request without a limit."""
    instances: int = Field(default=0, ge=0)
    """Batches of one model version computed at once, a count (Triton's instance count); 0 = automatic: on
    a CPU one single-threaded batch per core, and a lone request's batch on every core; on a GPU one."""
    workers: int = Field(default=1, ge=1)
    """Uvicorn worker processes, a count; each loads its own model copy, and `/metrics` reports them all."""
    client_error_delay_s: float = Field(default=0.05, ge=0.0, le=5.0)
    """Pause before every 4xx answer, in seconds (0 = none): a client that keeps sending requests the
    server refuses gets at most 1/delay answers a second per connection, at no CPU cost."""
    max_header_bytes: int = Field(default=65_536, ge=1024, le=1 << 20)
    """Largest request head (request line plus headers) a connection may send, in bytes; beyond it 431."""
    max_header_count: int = Field(default=100, ge=8, le=10_000)
    """Most header lines one request may carry, a count; beyond it 431."""
    admin_token: SecretStr | None = None
    """Bearer token for the repository API (load, unload, index) and every other write API; unset = open
    (refused with MODEL_CONTROL=explicit unless UNSAFE_UNAUTHENTICATED_ADMIN=true)."""
    admin_token_file: Path | None = None
    """File holding ADMIN_TOKEN (a Kubernetes/Compose secret), read at start-up; surrounding whitespace
    is ignored."""
    inference_token: SecretStr | None = None
    """Bearer token for inference and model metadata (/predict, /v2/models/...); unset = open."""
    inference_token_file: Path | None = None
    """File holding INFERENCE_TOKEN, read at start-up."""
    metrics_token: SecretStr | None = None
    """Bearer token for /metrics (give it to Prometheus); unset = /metrics is open."""
    metrics_token_file: Path | None = None
    """File holding METRICS_TOKEN, read at start-up."""
    token_header: str | None = None
    """A header that may carry the token instead of `Authorization: Bearer` (Triton's style, e.g.
    `admin-key`); unset = Authorization only."""
    unsafe_unauthenticated_admin: bool = False
    """Allow MODEL_CONTROL=explicit, and gallery writes, without ADMIN_TOKEN: anyone who reaches the port
    can load and unload models and change galleries (true/false). Only for a port nobody else can reach."""
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Browser origins allowed to call the API cross-site (CORS and the cross-origin check),
    comma-separated, e.g. `https://app.example.com`; empty = none."""
    tls_certfile: Path | None = None
    """PEM certificate chain to serve HTTPS with; unset = plain HTTP (terminate TLS in front instead)."""
    tls_keyfile: Path | None = None
    """PEM private key of TLS_CERTFILE."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)."""
    gallery_dir: Path | None = None
    """Directory holding every model's gallery of labelled examples (`<dir>/<model>/`); it must outlive
    the container (a persistent volume), and every worker and replica serving the same galleries mounts
    the same one. Unset = galleries off (their routes answer 404)."""
    gallery_max_entries: int = Field(default=50_000, ge=1, le=10_000_000)
    """Most examples one model's gallery holds, a count; an add past it gets 507. Search is exact, so a
    query's cost grows with it: ~1 ms at 10^4 entries, ~17 ms at 10^5 on 2 cores."""
    gallery_max_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)
    """Most bytes one model's gallery holds: its example images plus the embeddings of every model
    version it keeps, in bytes; an add past it gets 507 (each worker holds the embeddings in memory)."""
    gallery_k: int = Field(default=5, ge=1, le=100)
    """Nearest examples that vote on a gallery answer's labels, a count."""
    gallery_writes: bool = True
    """Whether clients may add and remove gallery examples (true/false): they need ADMIN_TOKEN (without
    one, writes get 403 unless UNSAFE_UNAUTHENTICATED_ADMIN=true); false = read-only here (403), e.g. on
    replicas that only answer queries."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Least severe log records written to stderr: DEBUG, INFO, WARNING or ERROR."""
    log_format: Literal["text", "json"] = "text"
    """`text`: one readable line per record; `json`: one JSON object per line (time, level, logger,
    message, worker pid, and for requests the request id, model, version, status and duration)."""
    opentelemetry: bool = False
    """FastAPI's native OpenTelemetry spans, metrics and logs, sent to the providers an OpenTelemetry SDK
    configures (e.g. `opentelemetry-instrument`). Off by default: looking for a provider costs ~0.2 ms
    of CPU on every request, and the service's own metrics are Prometheus."""

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _normalize_case(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return value.upper() if value.lower() in {"debug", "info", "warning", "error"} else value.lower()
        return value

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

    @field_validator("admin_token", "inference_token", "metrics_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_token(value.get_secret_value(), "the token")
        return value

    @field_validator("token_header")
    @classmethod
    def _check_token_header(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.strip().lower()
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", value) or value in _RESERVED_HEADERS:
                raise ValueError(
                    f"CONVSERVE_TOKEN_HEADER {value!r} must be a header name of letters, digits and dashes "
                    f"other than {sorted(_RESERVED_HEADERS)}, e.g. admin-key"
                )
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin):
                raise ValueError(
                    f"CONVSERVE_CORS_ORIGINS: {origin!r} is not an origin; write scheme://host[:port] "
                    "without a path, e.g. https://app.example.com (`*` is not accepted)"
                )
        return [origin.lower() for origin in value]

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
        if self.max_body_bytes_in_flight < self.max_upload_bytes:
            raise ValueError(
                f"CONVSERVE_MAX_BODY_BYTES_IN_FLIGHT ({self.max_body_bytes_in_flight}) is below "
                f"CONVSERVE_MAX_UPLOAD_BYTES ({self.max_upload_bytes}), so a body at the upload limit could "
                "never be accepted; raise it"
            )
        if self.max_decoded_pixels > self.max_image_pixels:
            raise ValueError(
                f"CONVSERVE_MAX_DECODED_PIXELS ({self.max_decoded_pixels}) is above "
                f"CONVSERVE_MAX_IMAGE_PIXELS ({self.max_image_pixels}); no image could use the difference"
            )
        for token in ("admin_token", "inference_token", "metrics_token"):
            if getattr(self, token) is not None and getattr(self, f"{token}_file") is not None:
                variable = f"CONVSERVE_{token.upper()}"
                raise ValueError(f"{variable} and {variable}_FILE are both set; keep one of them")
        if (
            self.model_control == "explicit"
            and not self.has_token("admin")
            and not self.unsafe_unauthenticated_admin
        ):
            raise ValueError(
                "CONVSERVE_MODEL_CONTROL=explicit lets clients load and unload models, but no "
                "CONVSERVE_ADMIN_TOKEN (or CONVSERVE_ADMIN_TOKEN_FILE) is set; set one, or accept that "
                "anyone who reaches the port can do it with CONVSERVE_UNSAFE_UNAUTHENTICATED_ADMIN=true"
            )
        if self.grpc_port == self.port:
            raise ValueError(
                f"CONVSERVE_GRPC_PORT and CONVSERVE_PORT are both {self.port}; give gRPC its own port "
                "(8001 by default) or set CONVSERVE_GRPC_PORT=0 to turn gRPC off"
            )
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("CONVSERVE_TLS_CERTFILE and CONVSERVE_TLS_KEYFILE must be set together")
        if self.tls_client_ca is not None and self.tls_certfile is None:
            raise ValueError(
                "CONVSERVE_TLS_CLIENT_CA (mutual TLS) needs CONVSERVE_TLS_CERTFILE and CONVSERVE_TLS_KEYFILE"
            )
        if self.require_gpu and not GPU_PROVIDERS & set(self.providers):
            raise ValueError(
                f"CONVSERVE_REQUIRE_GPU=true but CONVSERVE_PROVIDERS={','.join(self.providers)} has no GPU "
                "provider; add `cuda` to the providers or set CONVSERVE_REQUIRE_GPU=false"
            )
        return self

    def has_token(self, role: Literal["admin", "inference", "metrics"]) -> bool:
        """Whether a token (or a file holding one) is configured for `role`."""
        return getattr(self, f"{role}_token") is not None or getattr(self, f"{role}_token_file") is not None

    @property
    def memory_budget_bytes(self) -> int | None:
        """`memory_budget_mb` in bytes (None = no budget)."""
        return None if self.memory_budget_mb is None else self.memory_budget_mb * 1024 * 1024

    @property
    def max_queue_delay_s(self) -> float:
        """`max_queue_delay_ms` in seconds."""
        return self.max_queue_delay_ms / 1000.0
