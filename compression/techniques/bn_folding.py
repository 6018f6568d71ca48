"""BatchNorm folding: fold each eval-mode BatchNorm into the conv (or linear) layer that feeds it.

Two passes: first adjacent (Conv/ConvTranspose/Linear, BatchNorm) pairs inside ``nn.Sequential``
containers, which needs no tracing; then, if BatchNorms remain (e.g. ResNet's ``conv1``/``bn1``
attributes), an FX pass over the traced graph. A model FX cannot trace keeps the first pass's result.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from compression.context import CompressionContext
from compression.errors import TechniqueError
from compression.runtimes.cuda_support import exact_fp32
from compression.techniques.registry import register

log = logging.getLogger("slimserve.compression.bn_folding")

# NOTE: relative tolerance for the self-check after folding; folding is exact up to float rounding.
_CHECK_TOL = 1e-3


@dataclass(frozen=True)
class BnFoldConfig:
    """Fold BatchNorm into the preceding conv/linear layer (no fields)."""

    name: ClassVar[str] = "bn_fold"


def _foldable(first: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
        return False
    if bn.running_mean is None:
        return False
    if isinstance(first, nn.modules.conv._ConvNd):
        return first.out_channels == bn.num_features
    return isinstance(first, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and first.out_features == bn.num_features


def _fuse(first: nn.Module, bn: nn.Module) -> nn.Module:
    """The fused layer of a pair :func:`_foldable` accepted."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"cannot fold {type(bn).__name__}: not a BatchNorm")
    if isinstance(first, nn.Linear):
        return fuse_linear_bn_eval(first, bn)
    if isinstance(first, nn.modules.conv._ConvNd):
        return fuse_conv_bn_eval(first, bn, transpose=bool(first.transposed))
    raise TypeError(f"cannot fold BatchNorm into {type(first).__name__}")


def _fold_sequentials(model: nn.Module) -> int:
    """Fold adjacent pairs inside every ``nn.Sequential`` in place; returns how many were folded."""
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            first, bn = seq._modules[a], seq._modules[b]
            if first is not None and bn is not None and _foldable(first, bn):
                seq._modules[a] = _fuse(first, bn)
                seq._modules[b] = nn.Identity()
                folded += 1
    return folded


def _fold_fx(model: nn.Module) -> tuple[nn.Module, int]:
    """Trace ``model`` and fold every BatchNorm whose only input is a conv/linear used nowhere else."""
    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    folded = 0
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1:
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) > 1:
            continue
        first, bn = modules[prev.target], modules[node.target]
        # NOTE: a module called at several graph nodes cannot absorb one BN without changing the others.
        calls = sum(1 for n in traced.graph.nodes if n.op == "call_module" and n.target == prev.target)
        if calls > 1 or not _foldable(first, bn):
            continue
        parent_name, _, attr = str(prev.target).rpartition(".")
        parent = traced.get_submodule(parent_name) if parent_name else traced
        fused = _fuse(first, bn)
        setattr(parent, attr, fused)
        modules[prev.target] = fused
        node.replace_all_uses_with(prev)
        traced.graph.erase_node(node)
        folded += 1
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced, folded


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@register(BnFoldConfig)
def apply_bn_fold(model: nn.Module, config: BnFoldConfig, ctx: CompressionContext) -> nn.Module:
    result = copy.deepcopy(model).eval()
    folded = _fold_sequentials(result)
    if _count_bn(result):
        try:
            result, more = _fold_fx(result)
            folded += more
        except Exception as exc:  # noqa: BLE001 - FX raises many types for untraceable code
            # NOTE: tracing fails on data-dependent control flow; keep what the Sequential pass folded.
            log.info("FX tracing failed (%s); kept Sequential-pair folding only", exc)
    left = _count_bn(result)
    ctx.progress(f"bn_fold: folded {folded} BatchNorm layers, {left} left unfolded")
    _check_equal(model, result, ctx.example_inputs)
    return result


@torch.no_grad()
def _check_equal(original: nn.Module, folded: nn.Module, example: torch.Tensor) -> None:
    was_training = original.training
    original.eval()
    try:
        device = next(original.parameters()).device
        x = example.to(device)
        with exact_fp32():  # NOTE: TF32 rounding on GPUs would look like a folding error
            ref, out = original(x), folded(x)
    finally:
        original.train(was_training)
    err = float((ref - out).abs().max())
    scale = float(ref.abs().max()) or 1.0
    if err > _CHECK_TOL * max(1.0, scale):
        raise TechniqueError(f"bn_fold changed the outputs (max abs diff {err:.3g}); not folding this model")
