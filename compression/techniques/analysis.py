"""Figures every candidate reports: parameters, MACs, serialized and compressed size, sparsity."""

from __future__ import annotations

import io
import zlib

import torch
from torch import nn

from compression.runtimes.cuda_support import module_device

# NOTE: zlib level 6 (its default) is the usual speed/ratio trade-off; level 9 gains ~1% on float
# tensors at several times the cost. Zeros (sparsity) and repeated values (clustering) show at any level.
_ZLIB_LEVEL = 6

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _conv_macs(module: nn.modules.conv._ConvNd, inputs: torch.Tensor, output: torch.Tensor) -> int:
    kernel = 1
    for k in module.kernel_size:
        kernel *= k
    if module.transposed:
        # NOTE: a transposed conv scatters every input element into (out_channels / groups) * kernel outputs.
        per_sample_in = inputs[0].numel()
        return per_sample_in * (module.out_channels // module.groups) * kernel
    per_sample_out = output[0].numel()
    return per_sample_out * (module.in_channels // module.groups) * kernel


def _linear_macs(module: nn.Linear, inputs: torch.Tensor, output: torch.Tensor) -> int:
    # NOTE: (N, *, in) -> (N, *, out): every output element costs in_features MACs.
    return output[0].numel() * module.in_features


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass **per image** (conv, depthwise, transposed conv, linear).

    Runs the model on the first image of ``example``; element-wise ops, norms and pooling are not
    counted (they are a small share of a CNN and fold or fuse away at deploy time).
    """
    total = 0

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        inputs = args[0]
        if isinstance(module, nn.modules.conv._ConvNd):
            total += _conv_macs(module, inputs, output)
        else:
            total += _linear_macs(module, inputs, output)  # type: ignore[arg-type]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _WEIGHTED)]
    was_training = model.training
    model.eval()
    try:
        model(example[:1].to(module_device(model)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def _serialize(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def state_dict_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())`` in bytes."""
    return len(_serialize(model))


def compressed_bytes(model: nn.Module) -> int:
    """Size of the serialized state_dict after zlib: where sparsity and weight sharing pay off."""
    return len(zlib.compress(_serialize(model), _ZLIB_LEVEL))


def prunable_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weight tensors of conv and linear layers (the ones pruning and clustering act on)."""
    return [m.weight for m in model.modules() if isinstance(m, _WEIGHTED) and m.weight is not None]


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero elements over all conv and linear weights (0.0 if there are none)."""
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights)
    if total == 0:
        return 0.0
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total
