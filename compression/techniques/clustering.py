"""Weight sharing by per-layer k-means (Deep Compression, Han et al. 2016).

Each conv/linear weight tensor is replaced by at most ``2**bits`` distinct values (the centroids),
so it could be stored as ``bits``-bit indices plus a small codebook; here the model stays float32
(same speed) and the saving shows in ``compressed_bytes``. Biases and tiny layers are left alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compression.context import CompressionContext
from compression.errors import check_int
from compression.techniques.analysis import prunable_weights
from compression.techniques.registry import register


@dataclass(frozen=True)
class WeightClusterConfig:
    """Share ``2**bits`` values per layer, found by ``iterations`` Lloyd steps from a linear init."""

    name: ClassVar[str] = "weight_cluster"
    bits: int = 4
    iterations: int = 10
    min_elements: int = 1024
    """Layers with fewer weights than this are skipped (a codebook would not pay off)."""

    def __post_init__(self) -> None:
        check_int("bits", self.bits, 1, 8)
        check_int("iterations", self.iterations, 1, 100)
        check_int("min_elements", self.min_elements, 1)


@torch.no_grad()
def kmeans_1d(values: torch.Tensor, clusters: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means with linear init over [min, max]; returns (sorted centroids, index of each value).

    NOTE: in 1-D the nearest centroid is found by bucketizing against the midpoints of the sorted
    centroids, which is O(n log k) instead of the O(n k) distance matrix.
    """
    flat = values.flatten().float()
    centroids = torch.linspace(float(flat.min()), float(flat.max()), clusters, device=flat.device)
    assign = torch.zeros_like(flat, dtype=torch.long)
    for _ in range(iterations):
        centroids, _ = centroids.sort()
        assign = torch.bucketize(flat, (centroids[1:] + centroids[:-1]) / 2)
        sums = torch.zeros_like(centroids).scatter_add_(0, assign, flat)
        counts = torch.zeros_like(centroids).scatter_add_(0, assign, torch.ones_like(flat))
        # NOTE: an empty cluster keeps its old centroid rather than collapsing to zero.
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    centroids, _ = centroids.sort()
    assign = torch.bucketize(flat, (centroids[1:] + centroids[:-1]) / 2)
    return centroids, assign.view_as(values)


@register(WeightClusterConfig)
def apply_weight_cluster(model: nn.Module, config: WeightClusterConfig, ctx: CompressionContext) -> nn.Module:
    clustered = copy.deepcopy(model)
    clusters = 2**config.bits
    done = skipped = 0
    with torch.no_grad():
        for w in prunable_weights(clustered):
            if w.numel() < max(config.min_elements, clusters + 1):
                skipped += 1
                continue
            centroids, assign = kmeans_1d(w, clusters, config.iterations)
            w.copy_(centroids[assign].to(w.dtype))
            done += 1
    ctx.progress(f"weight_cluster: {done} layers clustered to <= {clusters} values, {skipped} small layers skipped")
    return clustered
