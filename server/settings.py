"""The deploy config: what to serve, how, and where. Validated before anything listens.

A YAML file (``slimserve serve --config PATH``) maps onto :class:`DeployConfig`. Relative paths in it
are resolved against the config file's folder. Without a file, :func:`default_config` serves the
bundled ``digits`` model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compression.settings import CompressionSettings

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a deploy config must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BuiltinSource(_Strict):
    format: Literal["builtin"] = "builtin"
    name: Literal["digits"] = "digits"
    """A model the project trains itself; ``digits`` is a small CNN trained on MNIST."""


class TorchvisionSource(_Strict):
    format: Literal["torchvision"]
    architecture: str
    """A torchvision classification model name, e.g. ``resnet18`` or ``mobilenet_v3_large``."""
    weights: Path | None = None
    """A state_dict file, loaded with ``torch.load(weights_only=True)``; ``None`` = random weights."""
    num_classes: int | None = None
    """Classes of the weights file; defaults to the number of labels."""
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the architecture constructor (e.g. ``width_per_group``)."""


class TorchScriptSource(_Strict):
    format: Literal["torchscript"]
    path: Path
    """A file written by ``torch.jit.save``."""


class ExportSource(_Strict):
    format: Literal["export"]
    path: Path
    """A ``.pt2`` file written by ``torch.export.save``."""


class PythonSource(_Strict):
    format: Literal["python"]
    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """``package.module:callable`` returning an ``nn.Module`` (your own architecture, importable by the
    server); its weights come from ``weights``. The module is imported, nothing is unpickled."""
    weights: Path | None = None
    """A state_dict file, loaded with ``torch.load(weights_only=True)``."""
    kwargs: dict[str, Any] = Field(default_factory=dict)


class PickleSource(_Strict):
    format: Literal["pickle"]
    path: Path
    """A whole ``nn.Module`` written by ``torch.save(model)``. Unpickling runs whatever code the file names."""
    trust_pickle: bool = False
    """Must be ``true`` to load ``path``: say so only for a file you built or otherwise trust."""

    @model_validator(mode="after")
    def _trusted(self) -> PickleSource:
        if not self.trust_pickle:
            raise ValueError(
                f"refusing to unpickle {self.path}: loading a pickled model runs code from the file. Set "
                "trust_pickle: true on this source if you trust the file, or ship a state_dict "
                "(format torchvision/python), TorchScript or torch.export file instead"
            )
        return self


ModelSource = Annotated[
    BuiltinSource | TorchvisionSource | TorchScriptSource | ExportSource | PythonSource | PickleSource,
    Field(discriminator="format"),
]


class PreprocessingSettings(_Strict):
    """How an encoded image becomes the model's input tensor (Classify only; ModelInfer takes tensors)."""

    channels: Literal[1, 3] = 3
    """1 = grayscale, 3 = RGB."""
    resize: int = Field(256, gt=0)
    """The shorter side is resized to this many pixels (bilinear)."""
    crop: int = Field(224, gt=0)
    """Then a centred square of this size is cropped; it is the model's input height and width."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    @model_validator(mode="after")
    def _check(self) -> PreprocessingSettings:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need one value per channel ({self.channels})")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        return self


class BatchingSettings(_Strict):
    max_batch_size: int = Field(32, ge=1, le=4096)
    """Most rows run in one forward pass; a request with more rows is rejected. Default 32; 64 for a model
    on ``cuda[:N]`` (see GPU_BATCHING_DEFAULTS)."""
    max_queue_delay_ms: float = Field(0.0, ge=0, le=1000)
    """How long a batch may wait for more requests. 0 = run at once when the model is idle; under load,
    requests that arrive while a batch runs are gathered into the next one anyway. Default 0; 2 ms for a
    model on ``cuda[:N]`` (see GPU_BATCHING_DEFAULTS)."""
    max_queue_size: int = Field(1024, ge=1)
    """Requests waiting for the model beyond this are refused with RESOURCE_EXHAUSTED."""


GPU_BATCHING_DEFAULTS: dict[str, Any] = {"max_batch_size": 64, "max_queue_delay_ms": 2.0}
"""``batching`` fields a model on ``cuda[:N]`` gets where its deploy config leaves them unset. A GPU's
throughput keeps growing with the batch up to dozens of images (one forward pass of 64 costs far less
than 64 of one), and waiting up to 2 ms lets batches fill under load; a lone client is never delayed
(the batcher waits only when fewer rows are queued than the last batch ran)."""


class ShadowSettings(_Strict):
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


class GuardrailSettings(_Strict):
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


class ModelSettings(_Strict):
    # NOTE: YAML reads `labels: [0, 1, 2]` as numbers; they are labels all the same.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: ModelSource
    labels: list[str] | None = None
    """Class labels, index order. Either this or ``labels_file``."""
    labels_file: Path | None = None
    """A text file with one label per line."""
    preprocessing: PreprocessingSettings = PreprocessingSettings()
    batching: BatchingSettings = BatchingSettings()
    device: str = "cpu"
    """``cpu`` or ``cuda[:N]``."""
    max_images_per_request: int = Field(64, ge=1)
    """Classify requests with more images are rejected with INVALID_ARGUMENT."""
    compression: CompressionSettings | None = None
    """Deploy-time compression under a budget; None = serve the original only."""
    shadow: ShadowSettings = ShadowSettings()
    guardrail: GuardrailSettings = GuardrailSettings()

    @model_validator(mode="before")
    @classmethod
    def _gpu_batching(cls, data: Any) -> Any:
        """On ``cuda[:N]``, the ``batching`` fields the config leaves unset take GPU_BATCHING_DEFAULTS."""
        if not isinstance(data, dict) or not str(data.get("device", "cpu")).startswith("cuda"):
            return data
        batching = data.get("batching", {})
        if isinstance(batching, BatchingSettings):
            batching = batching.model_dump(include=batching.model_fields_set)
        if not isinstance(batching, dict):
            return data  # NOTE: field validation reports what is wrong with it
        return {**data, "batching": {**GPU_BATCHING_DEFAULTS, **batching}}

    @model_validator(mode="after")
    def _check(self) -> ModelSettings:
        if self.labels is not None and self.labels_file is not None:
            raise ValueError("give either labels or labels_file, not both")
        target = self.compression.target.device if self.compression is not None else self.device
        if target.split(":")[0] != self.device.split(":")[0]:
            raise ValueError(
                f"compression.target.device is {target!r} but the model is served on {self.device!r}: the compressed "
                f"variant is built and measured where it will run; set compression.target.device to {self.device!r}"
            )
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "cpu" and not (value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit())):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {value!r}")
        return value


ImageFormat = Literal["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]
"""Formats ``server.allowed_image_formats`` may list (Pillow decoders)."""


class TlsSettings(_Strict):
    """TLS on the gRPC port; with ``client_ca_file`` also mutual TLS. PEM files; none set = plaintext."""

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


class AuthSettings(_Strict):
    """Bearer-token auth: every RPC but ``grpc.health.v1`` needs ``authorization: Bearer <token>``."""

    tokens_file: Path | None = None
    """A file with one accepted token per line (blank lines and ``#`` comments ignored)."""
    tokens_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """An environment variable holding accepted tokens, comma-separated."""

    @property
    def enabled(self) -> bool:
        return self.tokens_file is not None or self.tokens_env is not None


class ServerSettings(_Strict):
    host: str = "0.0.0.0"
    grpc_port: int = Field(8001, ge=0, le=65535)
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


class DeployConfig(_Strict):
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
    from server.digits.data import IMAGE_SIZE, LABELS, MEAN, STD

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


def _resolve_paths(config: DeployConfig, base: Path) -> DeployConfig:
    def resolve(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    models = []
    for model in config.models:
        source = model.source
        if isinstance(source, (TorchvisionSource, PythonSource)):
            source = source.model_copy(update={"weights": resolve(source.weights)})
        elif isinstance(source, (TorchScriptSource, ExportSource, PickleSource)):
            source = source.model_copy(update={"path": resolve(source.path)})
        compression = model.compression
        if compression is not None and compression.data.path is not None:
            data = compression.data.model_copy(update={"path": resolve(compression.data.path)})
            compression = compression.model_copy(update={"data": data})
        models.append(
            model.model_copy(
                update={
                    "source": source,
                    "labels_file": resolve(model.labels_file),
                    "compression": compression,
                }
            )
        )
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
