"""The deploy config: what to serve, how, and where. Validated before anything listens.

A YAML file (``slimserve serve --config PATH``) maps onto :class:`DeployConfig`. Relative paths in it
are resolved against the config file's folder. Without a file, :func:`default_config` serves the
bundled ``digits`` model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from compression.models.digits.data import IMAGE_SIZE, LABELS, MEAN, STD
from compression.models.settings import (
    BuiltinSource,
    ExportSource,
    PickleSource,
    PreprocessingSettings,
    PythonSource,
    StrictModel,
    TorchScriptSource,
    TorchvisionSource,
)
from compression.search.settings import CompressibleModel, CompressionSettings

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ShadowSettings(StrictModel):
    """Live comparison: a sample of requests also runs on the model's other variant, off the hot path."""

    fraction: float = Field(0.1, ge=0, le=1)
    """Share of requests (once a compressed variant serves) also run on the other variant; 0 = off."""
    max_pending: int = Field(64, ge=1)
    """Sampled requests waiting for an idle model; more are dropped (and counted), never delaying callers."""
    max_batch_size: int = Field(8, ge=1)
    """Most rows per shadow forward pass: a caller arriving meanwhile waits at most one such pass."""
    max_compute_share: float = Field(0.05, gt=0, le=1)
    """Most of the wall-clock time that shadow passes may take: after a pass of ``t`` seconds the next waits
    ``t / max_compute_share``. The model being idle does not mean the cores are (gRPC and decoding use
    them too), so this caps what comparison takes from serving."""


class GuardrailSettings(StrictModel):
    """Roll back to the original when live agreement with it falls below a threshold."""

    enabled: bool = True
    min_agreement: float = Field(0.9, gt=0, le=1)
    """Share of shadow-compared images whose top-1 matches between the original and the compressed variant."""
    window: int = Field(500, ge=10)
    """Agreement is taken over the last this many compared images."""
    min_samples: int = Field(100, ge=1)
    """No verdict before this many images have been compared (a few early disagreements are noise)."""

    @model_validator(mode="after")
    def _check(self) -> GuardrailSettings:
        if self.min_samples > self.window:
            raise ValueError(f"min_samples ({self.min_samples}) must not exceed window ({self.window})")
        return self


class ServingSettings(StrictModel):
    """Which variant answers requests that do not name one (``server/variants/policy.py``)."""

    policy: Literal["compressed", "original", "adaptive"] = "compressed"
    """``compressed``: the compressed variant once it is chosen; ``original``: always the original;
    ``adaptive``: the original while ``slo_p95_ms`` holds with the queue in front of it, the compressed
    variant when it would not."""
    slo_p95_ms: float | None = Field(None, gt=0)
    """The latency objective (ms, p95 of requests) that ``adaptive`` keeps; with any policy it is exported
    (``slimserve_serving_slo_seconds``) for the dashboard and the capacity alert."""
    return_below: float = Field(0.7, gt=0, le=1)
    """``adaptive`` moves back to the original only when its predicted latency is below this share of the
    objective (hysteresis)."""
    min_hold_s: float = Field(1.0, ge=0, le=600)
    """...and no sooner than this long after its last move."""

    @model_validator(mode="after")
    def _check(self) -> ServingSettings:
        if self.policy == "adaptive" and self.slo_p95_ms is None:
            raise ValueError("policy adaptive needs slo_p95_ms: the latency objective it keeps")
        return self


class ModelSettings(CompressibleModel):
    """One entry of ``models``: the model (:class:`ModelSpec`), its compression block, and how it is served."""

    serving: ServingSettings = ServingSettings()
    max_images_per_request: int = Field(64, ge=1)
    """Classify requests with more images are rejected with INVALID_ARGUMENT."""
    shadow: ShadowSettings = ShadowSettings()
    guardrail: GuardrailSettings = GuardrailSettings()


ImageFormat = Literal["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]
"""Formats ``server.allowed_image_formats`` may list (Pillow decoders)."""


class TlsSettings(StrictModel):
    """TLS on the gRPC and HTTP ports; with ``client_ca_file`` also mutual TLS. PEM files; none set = plaintext."""

    cert_file: Path | None = None
    """The server's certificate chain."""
    key_file: Path | None = None
    """The private key of ``cert_file``."""
    client_ca_file: Path | None = None
    """CA certificates that sign client certificates: clients without such a certificate are refused."""

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _check(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            raise ValueError(f"{given} is set but {missing} is not: give both (PEM certificate and its key) or neither")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file (mutual TLS) needs cert_file and key_file too")
        return self


class AuthSettings(StrictModel):
    """Bearer-token auth: every RPC but ``grpc.health.v1`` needs ``authorization: Bearer <token>``."""

    tokens_file: Path | None = None
    """A file with one accepted token per line (blank lines and ``#`` comments ignored)."""
    tokens_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """An environment variable holding accepted tokens, comma-separated."""

    @property
    def enabled(self) -> bool:
        return self.tokens_file is not None or self.tokens_env is not None


class TracingSettings(StrictModel):
    """OpenTelemetry tracing: a span per request (and per batch, per compression candidate), exported over
    OTLP/gRPC. Off by default; when off no tracer, exporter or span exists (docs/operations.md, "Tracing")."""

    enabled: bool = False
    """Export spans to ``otlp_endpoint``; ``false`` = no tracing work at all."""
    otlp_endpoint: str = "http://127.0.0.1:4317"
    """OTLP/gRPC receiver (an OpenTelemetry Collector, Jaeger, Tempo): ``http://`` = plaintext, ``https://`` =
    TLS with the system's CA certificates."""
    sampling_ratio: float = Field(1.0, ge=0, le=1)
    """Share of traces recorded when the caller sends no ``traceparent`` (``ParentBased(TraceIdRatioBased)``);
    a caller's ``traceparent`` decides for its own requests."""
    service_name: str = Field("slimserve", min_length=1)
    """``service.name`` of the spans, as the tracing backend lists them."""


class ServerSettings(StrictModel):
    host: str = "0.0.0.0"
    grpc_port: int = Field(8001, ge=0, le=65535)
    http_port: int | None = Field(8000, ge=0, le=65535)
    """KServe v2 REST port (Triton's default, 8000), on ``host``, with the gRPC port's TLS and auth; ``null``
    = no HTTP endpoint."""
    metrics_port: int = Field(8002, ge=0, le=65535)
    """HTTP port of the Prometheus ``/metrics`` endpoint."""
    metrics_host: str | None = None
    """Interface for the metrics endpoint; defaults to ``host``."""
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=4 * 1024 * 1024)
    """Largest gRPC message accepted or sent (grpcio's own default of 4 MiB fits only 6 images of 224x224)."""
    decode_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    """Threads that decode images for Classify."""
    refuse_before_close_s: float = Field(1.0, ge=0, le=60)
    """On shutdown, answer new requests with UNAVAILABLE for at least this long before closing the transport,
    so clients and load balancers hear it, rather than racing a closing connection."""
    max_image_pixels: int = Field(40_000_000, ge=1)
    """Decompression-bomb guard: images with more pixels are refused before decoding."""
    allowed_image_formats: tuple[ImageFormat, ...] = Field(("JPEG", "PNG"), min_length=1)
    """Encoded formats Classify decodes; others are refused with INVALID_ARGUMENT (fewer decoders, less attack
    surface)."""
    tls: TlsSettings = TlsSettings()
    auth: AuthSettings = AuthSettings()
    model_control: Literal["none", "explicit"] = "none"
    """``explicit``: clients may load, replace and unload models at run time through the repository API
    (``RepositoryModelLoad``/``Unload``, ``POST /v2/repository/models/{m}/load|unload``), as Triton's
    ``--model-control-mode=explicit``; models loaded so are not written back to the config file.
    ``none``: both calls are refused and the config file is the only source of models."""
    tracing: TracingSettings = TracingSettings()
    """OpenTelemetry spans over OTLP/gRPC (requests, batches, the compression search); off by default."""


class DeployConfig(StrictModel):
    server: ServerSettings = ServerSettings()
    models: list[ModelSettings] = Field(min_length=1)
    cache_dir: Path | None = None
    """Where trained and compressed artifacts are cached; default ``$SLIMSERVE_CACHE_DIR`` or
    ``~/.cache/slimserve``."""

    @model_validator(mode="after")
    def _unique_names(self) -> DeployConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or default_cache_dir()


class ConfigError(Exception):
    """The deploy config is invalid; the message names the field and what to change."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("SLIMSERVE_CACHE_DIR") or Path.home() / ".cache" / "slimserve")


def default_config() -> DeployConfig:
    """Serve the bundled ``digits`` model, compressed with the default budget: no config file needed."""
    digits = ModelSettings(
        name="digits",
        source=BuiltinSource(),
        labels=list(LABELS),
        preprocessing=PreprocessingSettings(channels=1, resize=IMAGE_SIZE, crop=IMAGE_SIZE, mean=MEAN, std=STD),
        compression=CompressionSettings(),
    )
    return DeployConfig(models=[digits])


def load_config(path: Path) -> DeployConfig:
    """Read and validate a YAML deploy config; relative paths are taken from the file's folder."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read deploy config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"deploy config {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"deploy config {path} must be a mapping with a 'models' list")
    try:
        config = DeployConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from exc
    config = _resolve_paths(config, path.parent.resolve())
    _check_server_files(config)
    return config


_FIXES = {
    "extra_forbidden": "unknown field: remove it or fix its spelling",
    "missing": "required field is missing: add it",
}
"""Pydantic error types whose own message does not say what to change."""


def format_validation_error(path: Path, exc: ValidationError) -> str:
    """One line per problem: the field's dotted path, then what is wrong and what to change."""
    lines = [f"invalid deploy config {path}:"]
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = _FIXES.get(error["type"], error["msg"].removeprefix("Value error, "))
        lines.append(f"  {location}: {message}")
    return "\n".join(lines)


def resolve_model_paths(model: ModelSettings, base: Path) -> ModelSettings:
    """``model`` with its relative file paths (weights, source files, labels, data) taken from ``base``."""

    def resolve(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    source = model.source
    if isinstance(source, (TorchvisionSource, PythonSource)):
        source = source.model_copy(update={"weights": resolve(source.weights)})
    elif isinstance(source, (TorchScriptSource, ExportSource, PickleSource)):
        source = source.model_copy(update={"path": resolve(source.path)})
    compression = model.compression
    if compression is not None and compression.data.path is not None:
        data = compression.data.model_copy(update={"path": resolve(compression.data.path)})
        compression = compression.model_copy(update={"data": data})
    return model.model_copy(
        update={"source": source, "labels_file": resolve(model.labels_file), "compression": compression}
    )


def _resolve_paths(config: DeployConfig, base: Path) -> DeployConfig:
    def resolve(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    models = [resolve_model_paths(model, base) for model in config.models]
    tls, auth = config.server.tls, config.server.auth
    server = config.server.model_copy(
        update={
            "tls": tls.model_copy(
                update={name: resolve(getattr(tls, name)) for name in ("cert_file", "key_file", "client_ca_file")}
            ),
            "auth": auth.model_copy(update={"tokens_file": resolve(auth.tokens_file)}),
        }
    )
    return config.model_copy(update={"server": server, "models": models, "cache_dir": resolve(config.cache_dir)})


def _check_server_files(config: DeployConfig) -> None:
    """The TLS and token files named in ``server`` must exist (after path resolution)."""
    tls, auth = config.server.tls, config.server.auth
    files = {f"server.tls.{name}": getattr(tls, name) for name in ("cert_file", "key_file", "client_ca_file")}
    files["server.auth.tokens_file"] = auth.tokens_file
    for field, path in files.items():
        if path is not None and not path.is_file():
            raise ConfigError(
                f"{field}: file {path} does not exist; fix the path (relative paths are taken from the config "
                "file's folder)"
            )
