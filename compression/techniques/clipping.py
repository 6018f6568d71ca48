"""Weight clipping: clamp outlier weights per layer, which narrows the range int8 has to cover."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compression.context import CompressionContext
from compression.errors import check_float
from compression.techniques.analysis import prunable_weights
from compression.techniques.registry import register


@dataclass(frozen=True)
class WeightClipConfig:
    """Clamp each conv/linear weight tensor to ``[-t, t]``, t = the ``percentile`` of |w|, or to
    ``mean +- k_std * std``. Set exactly one of the two (``percentile`` defaults to 99.9)."""

    name: ClassVar[str] = "weight_clip"
    percentile: float | None = 99.9
    k_std: float | None = None

    def __post_init__(self) -> None:
        if (self.percentile is None) == (self.k_std is None):
            raise ValueError("set exactly one of percentile and k_std (use percentile=None with k_std)")
        if self.percentile is not None:
            check_float("percentile", self.percentile, 50.0, 100.0, low_open=True, high_open=True)
        if self.k_std is not None:
            check_float("k_std", self.k_std, 0.0, low_open=True)


def clip_bounds(w: torch.Tensor, config: WeightClipConfig) -> tuple[float, float]:
    """The (low, high) clamp range of one weight tensor."""
    if config.k_std is not None:
        mean, std = float(w.mean()), float(w.std()) if w.numel() > 1 else 0.0
        return mean - config.k_std * std, mean + config.k_std * std
    flat = w.detach().abs().flatten().float()
    k = max(1, math.ceil(config.percentile / 100.0 * flat.numel()))  # type: ignore[operator]
    t = float(torch.kthvalue(flat.cpu(), k).values)
    return -t, t


@register(WeightClipConfig)
def apply_weight_clip(model: nn.Module, config: WeightClipConfig, ctx: CompressionContext) -> nn.Module:
    clipped_model = copy.deepcopy(model)
    clipped = total = 0
    with torch.no_grad():
        for w in prunable_weights(clipped_model):
            low, high = clip_bounds(w, config)
            clipped += int(((w < low) | (w > high)).sum())
            total += w.numel()
            w.clamp_(low, high)
    share = clipped / total if total else 0.0
    ctx.progress(f"weight_clip: clipped {clipped} of {total} weights ({share:.3%})")
    return clipped_model
