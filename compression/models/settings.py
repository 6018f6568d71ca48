"""What a served model is, as its deploy-config entry states it: source, labels, preprocessing, batch
limits, device. The serving and compression settings of the same entry build on :class:`ModelSpec`.

:class:`StrictModel` is the one base of every deploy-config section, here and in ``server.config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    """The base of every deploy-config section: unknown keys are errors (a typo in a deploy config must not be
    silently ignored) and settings are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BuiltinSource(StrictModel):
    format: Literal["builtin"] = "builtin"
    name: Literal["digits"] = "digits"
    """A model the project trains itself; ``digits`` is a small CNN trained on MNIST."""


class TorchvisionSource(StrictModel):
    format: Literal["torchvision"]
    architecture: str
    """A torchvision classification model name, e.g. ``resnet18`` or ``mobilenet_v3_large``."""
    weights: Path | None = None
    """A state_dict file, loaded with ``torch.load(weights_only=True)``; ``None`` = random weights."""
    num_classes: int | None = None
    """Classes of the weights file; defaults to the number of labels."""
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the architecture constructor (e.g. ``width_per_group``)."""


class TorchScriptSource(StrictModel):
    format: Literal["torchscript"]
    path: Path
    """A file written by ``torch.jit.save``."""


class ExportSource(StrictModel):
    format: Literal["export"]
    path: Path
    """A ``.pt2`` file written by ``torch.export.save``."""


class PythonSource(StrictModel):
    format: Literal["python"]
    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """``package.module:callable`` returning an ``nn.Module`` (your own architecture, importable by the
    server); its weights come from ``weights``. The module is imported, nothing is unpickled."""
    weights: Path | None = None
    """A state_dict file, loaded with ``torch.load(weights_only=True)``."""
    kwargs: dict[str, Any] = Field(default_factory=dict)


class PickleSource(StrictModel):
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


class PreprocessingSettings(StrictModel):
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


class BatchingSettings(StrictModel):
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


class ModelSpec(StrictModel):
    """The part of a model's deploy-config entry that says what the model is and how it runs."""

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
    def _check_labels(self) -> ModelSpec:
        if self.labels is not None and self.labels_file is not None:
            raise ValueError("give either labels or labels_file, not both")
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "cpu" and not (value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit())):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {value!r}")
        return value
