"""Fidelity of a candidate on held-out data: top-1, its drop against the original, and agreement.

The drop's 95% confidence interval uses the paired per-image difference (both models see the same
images), which is far tighter than comparing two independent accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Z95 = 1.959964


@dataclass(frozen=True)
class Fidelity:
    top1: float | None
    """Top-1 accuracy in [0, 1] when labels exist, else None."""
    top1_drop: float | None
    """Original top-1 minus this top-1, in percentage points (positive = worse)."""
    top1_drop_ci95: tuple[float, float] | None
    agreement: float
    """Fraction of images whose top-1 equals the original's."""
    agreement_ci95: tuple[float, float]
    samples: int


def predict_top1(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int) -> np.ndarray:
    """Top-1 class of every image, running ``predict`` on batches of at most ``batch_size``."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(predict(images[start : start + batch_size]).argmax(dim=1).cpu().numpy())
    return np.concatenate(out)


def fidelity(candidate: np.ndarray, original: np.ndarray, labels: np.ndarray | None) -> Fidelity:
    """Compare top-1 predictions of a candidate with the original's (and the labels, if any)."""
    n = len(candidate)
    agree = candidate == original
    agreement = float(agree.mean())
    if labels is None:
        return Fidelity(None, None, None, agreement, wilson_interval(int(agree.sum()), n), n)
    cand_correct = (candidate == labels).astype(np.float64)
    orig_correct = (original == labels).astype(np.float64)
    diff = (orig_correct - cand_correct) * 100.0
    drop = float(diff.mean())
    half = Z95 * float(diff.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
    return Fidelity(
        float(cand_correct.mean()), drop, (drop - half, drop + half), agreement, wilson_interval(int(agree.sum()), n), n
    )


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved near 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))
