"""The ``compression`` block of a model's deploy config: budget, target, data and search space."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from compression.models.settings import ModelSpec, StrictModel
from compression.runtimes.realization import RealizationConfig
from compression.techniques.registry import config_from_dict


class TargetSettings(StrictModel):
    device: str = "cpu"
    """Where the served variant runs and is measured: ``cpu`` or ``cuda[:N]``."""
    batch_size: int = Field(1, ge=1)
    """The batch size the latency budget is stated at."""


class BudgetSettings(StrictModel):
    max_latency_ms: float | None = Field(None, gt=0)
    """p95 latency at ``target.batch_size`` on ``target.device``; None = no latency budget."""
    max_accuracy_drop: float | None = Field(1.0, ge=0)
    """Top-1 drop in percentage points against the original, on the validation split (needs labels)."""
    min_agreement: float | None = Field(None, gt=0, le=1)
    """Alternative to a top-1 budget when there are no labels: fraction of top-1 equal to the original's."""
    objective: Literal["fastest", "most_accurate"] = "fastest"
    """``fastest`` within the accuracy budget, or ``most_accurate`` within the latency budget."""
    on_unmet: Literal["best_accuracy", "original", "fail"] = "best_accuracy"
    """When no candidate meets the latency budget: serve the fastest one that meets the accuracy budget
    (``best_accuracy``), serve the original, or fail the deploy."""
    confidence: float = Field(0.95, ge=0, lt=1)
    """One-sided level of the bounds a lossy variant is judged by: it is within ``max_accuracy_drop`` only
    when its top-1 drop's upper confidence bound is, and within ``min_agreement`` only when its agreement's
    lower bound is; 0 or at least 0.5 (0: the point estimate, the behaviour before bounds). Until search
    revision 4 this was the level of a two-sided interval (0.95 then meant a one-sided 0.975)."""
    max_class_drop: float | None = Field(None, ge=0)
    """Optional: reject a variant whose top-1 drop on any one class (with at least
    ``selection.MIN_CLASS_IMAGES`` validation images) exceeds this many points."""

    @field_validator("confidence")
    @classmethod
    def _one_sided_level(cls, value: float) -> float:
        if 0 < value < 0.5:
            raise ValueError(f"confidence is a one-sided level: 0 (point estimates) or in [0.5, 1), not {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> BudgetSettings:
        if self.max_accuracy_drop is None and self.min_agreement is None:
            raise ValueError("give max_accuracy_drop or min_agreement: a variant's accuracy must be bounded")
        return self


class DataSettings(StrictModel):
    """Calibration (for int8 and fine-tuning) and validation (for accuracy) images, disjoint."""

    source: Literal["builtin", "image_folder", "tensor_file"] = "builtin"
    """``builtin``: the digits splits. ``image_folder``: ``path/<class>/*.png|jpg`` (class folders in
    label order), preprocessed like served images. ``tensor_file``: a ``torch.save`` dict with
    ``images`` (N, C, H, W float32, preprocessed) and optionally ``labels`` (N,), read with
    ``weights_only=True``."""
    path: Path | None = None
    calibration_size: int = Field(1000, ge=8)
    validation_size: int = Field(500, ge=20)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DataSettings:
        if self.source != "builtin" and self.path is None:
            raise ValueError(f"data.path is required for source {self.source!r}")
        return self


class RatioSearchSettings(StrictModel):
    """Search the ratio of the candidate's ``channel_prune`` step instead of using the one written there."""

    low: float = Field(0.1, gt=0, lt=1)
    high: float = Field(0.8, gt=0, lt=1)
    resolution: float = Field(0.05, gt=0, lt=1)
    """The ratios tried lie on a grid from ``low`` to ``high`` in steps of this."""
    max_steps: int = Field(4, ge=1)
    """At most this many ratios are built (each one prunes and recovers): bisection needs about
    log2((high - low) / resolution + 1) of them to find the boundary."""
    realization: Literal["best", "as_given"] = "best"
    """``best``: realize each pruned model like the fastest candidate without training that is within the
    accuracy budget (e.g. int8 ONNX Runtime with its float fallback, else a lossless fp32 runtime), adding that
    candidate's steps; ``as_given``: use this candidate's own ``realization``."""

    @model_validator(mode="after")
    def _check(self) -> RatioSearchSettings:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class CandidateSettings(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    steps: list[dict[str, Any]] = Field(default_factory=list)
    """Techniques applied in order, each ``{technique: NAME, ...options}``."""
    realization: dict[str, Any] = Field(default_factory=dict)
    """``{runtime: eager|inductor|onnxruntime, precision: fp32|int8|fp16|bf16, ...}``."""
    ratio_search: RatioSearchSettings | None = None
    """Search the strength of the (one) ``channel_prune`` step: each ratio tried is built, recovered and
    measured as a variant of its own, named ``<name>-r<percent>[-<realization>]``; None = the ratio as written."""

    @field_validator("steps")
    @classmethod
    def _valid_steps(cls, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for index, step in enumerate(steps):
            try:
                config_from_dict(step)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"step {index}: {exc}") from exc
        return steps

    @model_validator(mode="after")
    def _one_pruning_step(self) -> CandidateSettings:
        if self.ratio_search is not None:
            pruning = [step for step in self.steps if step.get("technique") == "channel_prune"]
            if len(pruning) != 1:
                raise ValueError(
                    f"ratio_search needs exactly one channel_prune step to search the ratio of; {self.name!r} has "
                    f"{len(pruning)}"
                )
        return self

    @field_validator("realization")
    @classmethod
    def _valid_realization(cls, realization: dict[str, Any]) -> dict[str, Any]:
        try:
            RealizationConfig.from_dict(realization)
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from exc
        return realization


class MeasurementSettings(StrictModel):
    warmup: int = Field(10, ge=1)
    iterations: int = Field(60, ge=10)
    """Timed calls per candidate, interleaved round-robin across candidates."""


class SearchSettings(StrictModel):
    """How the search spends its time."""

    max_minutes: float | None = Field(None, gt=0)
    """Wall-clock budget for building candidates (cheap ones first); a candidate that would not finish in
    time is not started and the report lists it. None: no limit. The final measurement runs after it."""
    student_min_images: int = Field(10_000, ge=0)
    """A ``student`` step trained from scratch (no ``weights_path``) is skipped, with the reason in the
    report, when there are fewer calibration images than this."""


class CompressionSettings(StrictModel):
    enabled: bool = True
    target: TargetSettings = TargetSettings()
    budget: BudgetSettings = BudgetSettings()
    data: DataSettings = DataSettings()
    candidates: list[CandidateSettings] | None = None
    """The search space; None = the defaults for the target device (see compression/search/candidates.py)."""
    measurement: MeasurementSettings = MeasurementSettings()
    search: SearchSettings = SearchSettings()

    @model_validator(mode="after")
    def _unique(self) -> CompressionSettings:
        names = [c.name for c in self.candidates or []]
        if len(set(names)) != len(names) or "original" in names:
            raise ValueError("candidate names must be unique and not 'original'")
        return self


class CompressibleModel(ModelSpec):
    """A model's deploy-config entry as the search reads it: the model and its ``compression`` block."""

    compression: CompressionSettings | None = None
    """Deploy-time compression under a budget; None = serve the original only."""

    @model_validator(mode="after")
    def _check_target(self) -> CompressibleModel:
        target = self.compression.target.device if self.compression is not None else self.device
        if target.split(":")[0] != self.device.split(":")[0]:
            raise ValueError(
                f"compression.target.device is {target!r} but the model is served on {self.device!r}: the compressed "
                f"variant is built and measured where it will run; set compression.target.device to {self.device!r}"
            )
        return self
