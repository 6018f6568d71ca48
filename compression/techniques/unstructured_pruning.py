"""Global magnitude pruning (Han et al. 2015): zero the smallest weights of all conv/linear layers.

Honest scope: the zeros shrink *compressed* storage (gzip/zlib of the weights, or a sparse format)
but give **no speed-up on dense kernels**: the tensors keep their shapes and every multiply still
runs (measured 0.91-1.05x at 50% sparsity on this CPU). Use channel pruning for latency.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compression.context import CompressionContext
from compression.errors import check_float
from compression.techniques.analysis import prunable_weights, sparsity
from compression.techniques.distillation import (
    PRUNING_FIELDS_MOVED,
    DistillSettings,
    check_distill_settings,
    distill,
)
from compression.techniques.registry import register

MAGNITUDE_PRUNE_DISTILLATION = DistillSettings(epochs=0, time_budget_s=60.0, lr=1e-3)
"""No fine-tuning unless a ``magnitude_prune`` step's ``distillation`` block asks for epochs."""


@dataclass(frozen=True)
class MagnitudePruneConfig:
    """Zero the ``sparsity`` fraction of conv/linear weights with the smallest magnitude, network-wide."""

    name: ClassVar[str] = "magnitude_prune"
    sparsity: float = 0.5
    distillation: DistillSettings = MAGNITUDE_PRUNE_DISTILLATION
    """KD fine-tuning after pruning; pruned weights stay exactly zero (gradients masked)."""
    moved_fields: ClassVar[dict[str, str]] = PRUNING_FIELDS_MOVED

    def __post_init__(self) -> None:
        check_float("sparsity", self.sparsity, 0.0, 1.0, low_open=True, high_open=True)
        check_distill_settings("distillation", self.distillation)


@torch.no_grad()
def global_threshold(weights: list[torch.Tensor], target: float) -> float:
    """Magnitude below or at which ``target`` of all elements of ``weights`` lie (the global percentile)."""
    flat = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights])
    # NOTE: ceil, so at least ``target`` of the elements end up zero.
    k = min(flat.numel(), max(1, math.ceil(target * flat.numel() - 1e-9)))
    return float(torch.kthvalue(flat, k).values)


@register(MagnitudePruneConfig)
def apply_magnitude_prune(model: nn.Module, config: MagnitudePruneConfig, ctx: CompressionContext) -> nn.Module:
    pruned = copy.deepcopy(model).eval()
    weights = prunable_weights(pruned)
    if not weights:
        raise ValueError("magnitude_prune: the model has no conv/linear weights")
    threshold = global_threshold(weights, config.sparsity)
    masks: dict[torch.Tensor, torch.Tensor] = {}
    with torch.no_grad():
        for w in weights:
            # NOTE: everything at or below the threshold goes, ties included: sparsity is at least the target.
            keep = w.abs() > threshold
            w.mul_(keep)
            masks[w] = keep
    ctx.progress(f"magnitude_prune: threshold {threshold:.4g}, sparsity {sparsity(pruned):.2%}")
    if config.distillation.epochs > 0:

        def mask_gradients(student: nn.Module) -> None:
            # NOTE: zero gradient from the first step means Adam's moments stay zero there too, and
            # decoupled weight decay of a zero weight is zero: pruned weights never move.
            for param, keep in masks.items():
                if param.grad is not None:
                    param.grad.mul_(keep)

        distill(pruned, ctx.teacher, ctx.calibration_inputs, config.distillation, ctx, before_step=mask_gradients)
        ctx.progress(f"magnitude_prune: sparsity after fine-tuning {sparsity(pruned):.2%}")
    return pruned
