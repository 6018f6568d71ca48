"""Per-layer pruning ratios from a quick sensitivity scan: prune less where pruning hurts more.

Each prunable group of coupled layers (torch-pruning's DepGraph: a conv and everything that must lose the
same channels, e.g. every conv feeding one residual sum) is pruned alone, at the target ratio, in a copy
of the model, with no recovery; its *sensitivity* is the mean KL divergence of the copy's predictions
from the original's on calibration images. The ratios are then ``r_g = min(cap, lam * sqrt(mean_s / s_g))``
with ``lam`` chosen so that the channel-weighted mean of the ratios is the target ratio: the channels
removed are the same as uniform pruning's, taken more from the groups whose removal changed the outputs
least. The square root tempers the allocation (a heuristic: measured against uniform and torch-pruning's
global pruning in docs/compression.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

SCAN_IMAGES = 256
ROOT_TYPES = [nn.modules.conv._ConvNd, nn.Linear]
"""The layers whose output channels start a group (torch-pruning's default, less LSTMs)."""
_EPSILON = 1e-6


@dataclass(frozen=True)
class GroupSensitivity:
    root: str
    """Name of the group's root module (the layer whose output channels the group removes)."""
    channels: int
    sensitivity: float
    """Mean KL(original || pruned alone at the probe ratio) on the scan images, in nats."""


def scan(
    model: nn.Module,
    example: torch.Tensor,
    images: torch.Tensor,
    ratio: float,
    ignored: list[nn.Module],
    make_pruner: Callable[[nn.Module, dict[nn.Module, float]], tp.pruner.BasePruner],
    prepare: Callable[[nn.Module], None] = lambda copy: None,
) -> list[GroupSensitivity]:
    """The sensitivity of every prunable group of ``model`` (left unchanged; ``ignored`` modules are not
    pruned) at ``ratio``.

    ``make_pruner(copy, ratios)`` builds the pruner for a copy with the given per-root-module ratios (every
    other group at 0); ``prepare(copy)`` runs before each copy is pruned (e.g. to populate gradients).
    """
    images = images[:SCAN_IMAGES]
    with torch.no_grad():
        reference = F.log_softmax(model(images), dim=1)
    graph = tp.DependencyGraph().build_dependency(model, example)
    names = {module: name for name, module in model.named_modules()}
    roots = [
        names[group[0].dep.target.module]
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES)
    ]
    found = []
    for root in roots:
        pruned = copy.deepcopy(model)
        module = dict(pruned.named_modules())[root]
        prepare(pruned)
        make_pruner(pruned, {module: ratio}).step()
        pruned.zero_grad(set_to_none=True)
        with torch.no_grad():
            outputs = F.log_softmax(pruned(images), dim=1)
        divergence = float(F.kl_div(outputs, reference, log_target=True, reduction="batchmean"))
        channels = _channels(dict(model.named_modules())[root])
        found.append(GroupSensitivity(root, channels, max(divergence, 0.0)))
    return found


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(getattr(module, "out_channels"))


def allocate(groups: list[GroupSensitivity], ratio: float, cap: float) -> dict[str, float]:
    """Per-root ratios whose channel-weighted mean is ``ratio`` (as close as ``cap`` allows), lower where the
    sensitivity is higher (see the module docstring)."""
    if not groups:
        return {}
    mean = sum(g.sensitivity for g in groups) / len(groups)
    weights = {g.root: ((mean + _EPSILON) / (g.sensitivity + _EPSILON)) ** 0.5 for g in groups}
    total = sum(g.channels for g in groups)

    def mean_ratio(scale: float) -> float:
        return sum(g.channels * min(cap, scale * weights[g.root]) for g in groups) / total

    low, high = 0.0, ratio / min(weights.values())
    for _ in range(60):  # NOTE: mean_ratio is monotone in the scale: bisect it
        middle = (low + high) / 2
        low, high = (middle, high) if mean_ratio(middle) < ratio else (low, middle)
    return {g.root: round(min(cap, high * weights[g.root]), 4) for g in groups}
