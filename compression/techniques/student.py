"""A smaller student network distilled from the teacher, or loaded pre-distilled from disk."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from compression.context import CompressionContext
from compression.errors import TechniqueError
from compression.techniques.analysis import count_params
from compression.techniques.distillation import DistillSettings, check_distill_settings, distill
from compression.techniques.registry import register
from compression.techniques.student_models import build_student, is_known_architecture

_JSON_SCALARS = (str, int, float, bool, type(None))

STUDENT_DISTILLATION = DistillSettings(epochs=30, time_budget_s=300.0, lr=5e-3)
"""How a ``student`` step trains unless its ``distillation`` block says otherwise."""


@dataclass(frozen=True)
class StudentConfig:
    """Replace the model by ``architecture`` (built with ``arch_kwargs``), distilled from ``ctx.teacher``,
    or, with ``weights_path``, loaded from a pre-distilled state_dict of that architecture."""

    name: ClassVar[str] = "student"
    architecture: str = "depthwise_separable"
    # NOTE: hash=False keeps the frozen config hashable although a dict is not.
    arch_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    weights_path: str | None = None
    distillation: DistillSettings = STUDENT_DISTILLATION
    """How the student learns from the teacher (ignored with ``weights_path``; ``epochs: 0``: untrained)."""
    moved_fields: ClassVar[dict[str, str]] = {
        name: f"distillation.{name}" for name in ("epochs", "time_budget_s", "temperature", "alpha", "lr", "augment")
    }
    """The flat fields from before the ``distillation`` block, and where each went."""

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or not is_known_architecture(self.architecture):
            raise ValueError(
                f"unknown student architecture {self.architecture!r} "
                "(use 'digits', 'depthwise_separable' or a torchvision classification model)"
            )
        if not isinstance(self.arch_kwargs, dict) or not all(
            isinstance(k, str) and isinstance(v, _JSON_SCALARS) for k, v in self.arch_kwargs.items()
        ):
            raise ValueError(f"arch_kwargs must map names to JSON scalars, got {self.arch_kwargs!r}")
        object.__setattr__(self, "arch_kwargs", dict(self.arch_kwargs))  # NOTE: a private copy
        path = self.weights_path
        if path is not None and (not isinstance(path, str) or not path):
            raise ValueError(f"weights_path must be a non-empty path string or None, got {path!r}")
        check_distill_settings("distillation", self.distillation)


def _load_weights(student: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise TechniqueError(f"student weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        student.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - unpickling and key/shape mismatches raise many types
        raise TechniqueError(f"cannot load student weights {path}: {exc}") from exc


@register(StudentConfig)
def apply_student(model: nn.Module, config: StudentConfig, ctx: CompressionContext) -> nn.Module:
    teacher = ctx.teacher
    example = ctx.example_inputs
    with torch.no_grad():
        teacher_out = teacher(example.to(next(teacher.parameters()).device))
    if teacher_out.ndim != 2:
        raise TechniqueError(f"student needs (batch, classes) logits from the teacher, got {tuple(teacher_out.shape)}")
    in_channels, num_classes = example.shape[1], teacher_out.shape[1]
    # NOTE: seed the initialisation too, so one ctx.seed gives one student.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        try:
            student = build_student(config.architecture, in_channels, num_classes, **config.arch_kwargs)
        except ValueError as exc:
            raise TechniqueError(str(exc)) from exc
    if config.weights_path is not None:
        _load_weights(student, config.weights_path)
    student.eval()
    try:
        with torch.no_grad():
            out = student(example[:2])
    except Exception as exc:  # noqa: BLE001
        raise TechniqueError(
            f"student {config.architecture!r} cannot run on inputs of shape {tuple(example.shape)}: {exc}"
        ) from exc
    if tuple(out.shape) != (min(2, len(example)), num_classes):
        raise TechniqueError(f"student output shape {tuple(out.shape)} does not match the teacher's classes")
    ratio = count_params(student) / max(1, count_params(teacher))
    ctx.progress(f"student {config.architecture}: {count_params(student)} params ({ratio:.1%} of the teacher)")
    if config.weights_path is None and config.distillation.epochs > 0:
        distill(student.to(ctx.device), teacher, ctx.calibration_inputs, config.distillation, ctx)
    if not all(math.isfinite(float(p.detach().abs().sum())) for p in student.parameters()):
        raise TechniqueError("student weights are not finite after distillation (lr too high?)")
    return student.eval()
