"""Fidelity of a candidate on held-out data: top-1, its drop against the original, and agreement.

The drop's 95% confidence interval uses the paired per-image difference (both models see the same
images), which is far tighter than comparing two independent accuracies.

Selection judges a variant by :func:`evidence`: the drop's one-sided upper confidence bound at the
budget's ``confidence`` (from Agresti and Min's adjusted interval for matched pairs, which, unlike the
plain paired interval, does not collapse to zero width when no image disagrees), and the agreement's
one-sided Wilson lower bound. One-sided, because the budget asks one question: is the drop at most
``max_accuracy_drop``?
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from compression.search.selection import Evidence

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


def z_value(confidence: float) -> float:
    """The normal quantile of a one-sided ``confidence`` bound (1.645 for 0.95; 0 for 0: the point estimate)."""
    return NormalDist().inv_cdf(confidence) if confidence > 0 else 0.0


def wilson_lower(successes: int, n: int, z: float) -> float:
    if n == 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n))


def evidence(
    candidate: np.ndarray,
    original: np.ndarray,
    labels: np.ndarray | None,
    *,
    confidence: float,
    max_drop: float | None,
    min_agreement: float | None,
) -> Evidence:
    """Fidelity on one part of the validation split, with the bounds selection judges a variant by.

    ``images_needed``: how many images this part would need for the bounds to meet the budget, were the
    observed disagreement rates the true ones (None when a point estimate already misses the budget).
    """
    n = len(candidate)
    z = z_value(confidence)
    agreeing = int((candidate == original).sum())
    agreement = agreeing / n if n else 0.0
    needed: list[float] = []
    drop = upper = None
    if labels is not None and n:
        orig_right, cand_right = original == labels, candidate == labels
        lost, gained = int((orig_right & ~cand_right).sum()), int((~orig_right & cand_right).sum())
        drop = (lost - gained) / n * 100
        if z == 0:
            upper = drop
        else:  # Agresti-Min: half an image added to each discordant cell (and to the concordant ones)
            b, c, m = lost + 0.5, gained + 0.5, n + 2
            upper = ((b - c) / m + z * math.sqrt(max((b + c) - (b - c) ** 2 / m, 0.0)) / m) * 100
        if max_drop is not None:
            d, budget = (lost - gained) / n, max_drop / 100
            spread = (lost + gained) / n - d * d
            if d >= budget:
                needed.append(math.inf)
            else:
                room = max(budget - d, 1e-9)
                needed.append(max((z * math.sqrt(spread) / room) ** 2, z / max(budget, 1e-9) - 2))
    lower = wilson_lower(agreeing, n, z) if n else 0.0
    if min_agreement is not None:
        if agreement <= min_agreement and agreement < 1:
            needed.append(math.inf)
        elif agreement == 1:
            needed.append(z * z * min_agreement / (1 - min_agreement) if min_agreement < 1 else math.inf)
        else:
            needed.append(z * z * agreement * (1 - agreement) / (agreement - min_agreement) ** 2)
    images_needed = None if not needed or math.isinf(max(needed)) else max(n, math.ceil(max(needed)))
    return Evidence(
        n,
        None if drop is None else round(drop, 4),
        None if upper is None else round(upper, 4),
        round(agreement, 6),
        round(lower, 6),
        images_needed,
    )


def class_drops(candidate: np.ndarray, original: np.ndarray, labels: np.ndarray) -> dict[str, tuple[int, float]]:
    """Per class (label index as a string): validation images of it, and the top-1 drop on them in points."""
    out = {}
    for label in np.unique(labels):
        mask = labels == label
        drop = float(((original[mask] == label).mean() - (candidate[mask] == label).mean()) * 100)
        out[str(int(label))] = (int(mask.sum()), round(drop, 4))
    return out
