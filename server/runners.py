"""Callables that run one batch through a model on its device (the batcher's ``forward``)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from server.batching import Forward

# NOTE: request tensors are read-only views of the gRPC message (zero-copy); models do not write to
# their inputs, so torch's one-time warning about non-writable arrays is noise here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def eager_forward(module: nn.Module, device: str) -> Forward:
    """Run ``module`` in eval mode on ``device``; inputs arrive on the CPU, logits return there."""
    target = torch.device(device)
    module = module.eval().to(target)
    if target.type == "cpu":
        return module

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return module(batch.pin_memory().to(target, non_blocking=True)).float().cpu()

    return forward
